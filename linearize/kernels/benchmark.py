"""Speed of the attention kernels against softmax attention (``linearize bench kernels``).

On a GPU: the fused Triton kernels (causal linear attention and the window + linear hybrid) in
bf16 against torch SDPA (FlashAttention backend) and, when installed, flash-linear-attention's
``chunk_linear_attn``. On a CPU: the exact PyTorch forms in fp32 (plain linear, and the hybrid both
quadratic and chunked, which sets ``QUADRATIC_MAX_LENGTH``) against SDPA; the Triton kernels only
run in an interpreter there, which says nothing about speed.

Each case is timed forward only and forward + backward, as the best of a few runs after a warmup,
with the device synchronised around every run. Results go to ``kernels.json``, ``kernels.md`` and
``kernels.png`` in the output directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.kernels import reference

GPU_LENGTHS = [1024, 2048, 4096, 8192, 16384]
CPU_LENGTHS = [128, 256, 512, 1024, 2048, 4096, 8192]
QUADRATIC_LIMIT = 2048  # longest T the CPU benchmark runs the quadratic form at
WINDOW, SINKS = 64, 4  # the hybrid setting of the design (64-key window plus 4 sinks)


@dataclass(frozen=True)
class BenchShape:
    """Sizes of one benchmarked attention layer call: q/k [B, H, T, d], features F, values D."""

    batch: int
    heads: int
    head_dim: int
    feature_dim: int
    value_dim: int
    dtype: str
    warmup: int
    repeats: int


GPU_SHAPE = BenchShape(batch=2, heads=32, head_dim=64, feature_dim=128, value_dim=64, dtype="bfloat16",
                       warmup=3, repeats=10)
# SmolLM2-135M sizes (9 heads of 64); few repeats so a 2-core machine finishes in a couple of minutes.
CPU_SHAPE = BenchShape(batch=1, heads=9, head_dim=64, feature_dim=128, value_dim=64, dtype="float32",
                       warmup=1, repeats=3)

Inputs = dict[str, torch.Tensor]
Variant = Callable[[Inputs], torch.Tensor]


def _inputs(shape: BenchShape, length: int, device: str) -> Inputs:
    dtype = getattr(torch, shape.dtype)
    size = (shape.batch, shape.heads, length)

    def make(*dims: int, positive: bool = False) -> torch.Tensor:
        t = torch.rand(*dims, device=device) if positive else torch.randn(*dims, device=device)
        return t.to(dtype).requires_grad_()

    return {
        "q": make(*size, shape.head_dim), "k": make(*size, shape.head_dim), "v": make(*size, shape.value_dim),
        "fq": make(*size, shape.feature_dim, positive=True), "fk": make(*size, shape.feature_dim, positive=True),
        "gamma": torch.full((shape.heads,), 0.5, device=device, requires_grad=True),
    }


def _sdpa(x: Inputs) -> torch.Tensor:
    if x["q"].is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)


def _reference(window: int, sinks: int, form: str = "torch") -> Variant:
    """The PyTorch path (``form="torch"``: the one CPU runs pick) or one named form of it."""
    function = getattr(reference, f"hybrid_attention_{form}")

    def run(x: Inputs) -> torch.Tensor | None:
        if form == "quadratic" and x["q"].shape[2] > QUADRATIC_LIMIT:
            return None  # [T, T] weights per head: several GiB beyond this
        spec = reference.AttentionSpec(window=window, sinks=sinks, scaling=x["q"].shape[-1] ** -0.5)
        out = function(x["q"], x["k"], x["v"], x["fq"], x["fk"], x["gamma"], spec)
        return out[0] if isinstance(out, tuple) else out

    return run


def _variants(device: str) -> dict[str, Variant]:
    """The implementations to time on ``device``, SDPA first (the baseline of every speed-up)."""
    variants: dict[str, Variant] = {"sdpa": _sdpa}
    if device == "cpu":
        variants["reference linear"] = _reference(0, 0)
        for form in ("quadratic", "chunked"):  # where one beats the other: QUADRATIC_MAX_LENGTH
            variants[f"{form} hybrid w{WINDOW}+{SINKS}"] = _reference(WINDOW, SINKS, form)
        return variants
    from linearize.kernels import triton as kernels

    variants["triton linear"] = lambda x: kernels.chunk_linear_attention(x["fq"], x["fk"], x["v"])[0]
    variants[f"triton hybrid w{WINDOW}+{SINKS}"] = lambda x: kernels.chunk_hybrid_attention(
        x["q"], x["k"], x["v"], x["fq"], x["fk"], x["gamma"], window=WINDOW, sinks=SINKS,
        scaling=x["q"].shape[-1] ** -0.5,
    )[0]
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        print("flash-linear-attention (fla) is not installed: skipping its baseline")
        return variants

    def fla_linear(x: Inputs) -> torch.Tensor:
        # fla takes [B, T, H, K]; scale 1 because the features are already mapped.
        q, k, v = (x[name].transpose(1, 2) for name in ("fq", "fk", "v"))
        return chunk_linear_attn(q=q, k=k, v=v, scale=1.0, normalize=True)[0]

    variants["fla linear"] = fla_linear
    return variants


def _time_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Best wall time of ``fn`` over ``repeats`` runs in milliseconds, synchronising the device around
    each run. The minimum, not the mean: other load on the machine only ever adds time."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def _measure(variant: Variant, x: Inputs, device: str, shape: BenchShape) -> dict[str, float | None]:
    """Forward and forward + backward times (ms) of one variant; None where it ran out of memory or
    skips the length."""

    def forward() -> torch.Tensor | None:
        with torch.no_grad():
            return variant(x)

    def forward_backward() -> None:
        out = variant(x)
        if out is not None:
            out.backward(torch.ones_like(out))

    if forward() is None:  # the variant skips this length
        return {"fwd": None, "fwd+bwd": None}

    times: dict[str, float | None] = {}
    for mode, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        try:
            times[mode] = _time_ms(fn, device, shape.warmup, shape.repeats)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            times[mode] = None
        for t in x.values():
            t.grad = None
    return times


def _markdown(rows: list[dict], names: list[str]) -> str:
    """Table: one line per (T, mode), one column per variant in ms, then speed-ups over SDPA."""
    others = [n for n in names if n != "sdpa"]
    header = ["T", "mode", *(f"{n} (ms)" for n in names), *(f"{n} vs sdpa" for n in others)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ms = [row["ms"].get(n) for n in names]
        speedups = [row["speedup"].get(n) for n in others]
        cells = [str(row["length"]), row["mode"], *(f"{t:.2f}" if t is not None else "-" for t in ms),
                 *(f"{s:.2f}x" if s is not None else "-" for s in speedups)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], names: list[str], path: Path, title: str) -> bool:
    """Time against length, log-log, one panel per mode. False (and a hint) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so {path.name} was not written: pip install matplotlib")
        return False
    modes = ["fwd", "fwd+bwd"]
    fig, axes = plt.subplots(1, len(modes), figsize=(11, 4))
    for ax, mode in zip(axes, modes):
        for name in names:
            points = [(r["length"], r["ms"][name]) for r in rows if r["mode"] == mode and r["ms"].get(name)]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="ms", title=mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_kernel_benchmark(
    output_dir: Path, lengths: list[int] | None = None, device: str | None = None, shape: BenchShape | None = None
) -> dict:
    """Time the attention implementations and write kernels.{json,md,png} to ``output_dir``.

    Args:
        output_dir: where the results go (created if missing).
        lengths: sequence lengths; default 1k..16k on a GPU and 512..2k on a CPU.
        device: "cuda" or "cpu"; default CUDA when available.
        shape: the sizes to time (e.g. Llama-3-8B heads, head_dim = value_dim = 128 with
            feature_dim = 256); default ``GPU_SHAPE`` on a GPU, ``CPU_SHAPE`` on a CPU.
    Returns:
        {"device", "shape", "variants", "rows": [{"length", "mode", "ms": {variant: ms}, "speedup":
        {variant: sdpa ms / variant ms}}], "files"}. Times are None where a case ran out of memory.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    on_gpu = device != "cpu"
    shape = shape or (GPU_SHAPE if on_gpu else CPU_SHAPE)
    lengths = lengths or (GPU_LENGTHS if on_gpu else CPU_LENGTHS)
    variants = _variants(device)
    names = list(variants)
    device_name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"

    rows = []
    for length in lengths:
        x = _inputs(shape, length, device)
        times = {name: _measure(variant, x, device, shape) for name, variant in variants.items()}
        for mode in ("fwd", "fwd+bwd"):
            ms = {name: times[name][mode] for name in names}
            base = ms["sdpa"]
            speedup = {n: base / t if base and t else None for n, t in ms.items() if n != "sdpa"}
            rows.append({"length": length, "mode": mode, "ms": ms, "speedup": speedup})
            print(f"T={length:>6} {mode:<8} " + "  ".join(
                f"{n}: {s:.2f}x" if s else f"{n}: -" for n, s in speedup.items()) + "  (speed-up over sdpa)")

    output_dir.mkdir(parents=True, exist_ok=True)
    title = f"{device_name}, {shape.dtype}, B={shape.batch} H={shape.heads} d={shape.head_dim} F={shape.feature_dim}"
    table = _markdown(rows, names)
    (output_dir / "kernels.md").write_text(f"Attention kernels on {title}\n\n{table}")
    files = {"json": str(output_dir / "kernels.json"), "markdown": str(output_dir / "kernels.md")}
    if _plot(rows, names, output_dir / "kernels.png", title):
        files["plot"] = str(output_dir / "kernels.png")
    result = {"device": device_name, "shape": asdict(shape), "variants": names, "rows": rows, "files": files}
    (output_dir / "kernels.json").write_text(json.dumps(result, indent=2))
    return result
