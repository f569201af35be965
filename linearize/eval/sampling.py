"""Repeated sampling, teacher vs student: coverage@k and majority vote@k against wall-clock seconds.

Large Language Monkeys (Brown et al. 2024, arXiv 2407.21787) shows that where answers can be
verified, coverage (the share of problems solved by any of k samples) keeps growing with k, and
that a cheaper model sampled more often can beat a stronger one at equal cost. A linearized student
is such a cheaper model: ``generate(num_return_sequences=n)`` prefills its prompt once and forks
the fixed-size state. So the question is which model solves more problems for the same seconds.

Per task and problem, every model draws ``samples`` completions in ``generate`` calls of at most
``batch_size`` samples each (the models alternate problem by problem, so a machine that slows down
slows both). From those N samples:

* ``coverage@k``: the unbiased pass@k estimator, averaged over problems, for k = 1, 2, 4, ... N;
* ``majority@k``: the chance that the most common answer of k samples is right (random subsets);
* ``seconds@k``: k/N of the measured wall time of the N samples, summed over the problems, i.e. the
  cost of k samples per problem at the measured throughput.

Every finished problem is appended to ``sampling_samples.jsonl`` in the output folder as it lands,
so an interrupted run resumes where it stopped and the summary always covers every sample kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from linearize.errors import UserError
from linearize.eval.machine import machine_settings, synchronize
from linearize.eval.sampling_metrics import crossings, fit_power_law, majority_at_k, pass_at_k
from linearize.eval.sampling_tasks import Problem, SamplingTask, sampling_task

SAMPLES_FILE, SAMPLING_FILE = "sampling_samples.jsonl", "sampling.json"
MAJORITY_TRIALS = 200  # random k-subsets per problem for majority@k (k < N)
LONG_RUN_SECONDS = 3600  # beyond this the estimate says how to cut the run


@dataclass(frozen=True)
class SamplingSettings:
    """What is sampled; saved next to the results. ``samples`` and ``limits`` hold per-task overrides
    of ``default_samples`` / ``default_limit`` (None: every problem of the task)."""

    tasks: tuple[str, ...] = ("gsm8k", "arithmetic")
    default_samples: int = 16
    samples: dict[str, int] = field(default_factory=dict)
    default_limit: int | None = None
    limits: dict[str, int] = field(default_factory=dict)
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: each task's own (gsm8k 192, arithmetic 8)
    batch_size: int = 16
    seed: int = 0

    def validate(self) -> None:
        """Raise the UserError a run would hit, before any model loads."""
        if not self.tasks:
            raise UserError("no sampling task given. Fix: pass --tasks gsm8k,arithmetic")
        for name in self.tasks:
            sampling_task(name)
        for option, overrides in (("--samples", self.samples), ("--limit", self.limits)):
            stray = sorted(set(overrides) - set(self.tasks))
            if stray:
                raise UserError(f"{option} names task(s) not sampled: {', '.join(stray)}. Fix: use tasks from --tasks")
        if min([self.default_samples, *self.samples.values()]) < 1:
            raise UserError("--samples must be >= 1 per task")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise UserError("--batch-size and --max-new-tokens must be >= 1")

    def task_samples(self, task: str) -> int:
        return self.samples.get(task, self.default_samples)

    def task_limit(self, task: str) -> int | None:
        return self.limits.get(task, self.default_limit)

    def new_tokens(self, task: SamplingTask) -> int:
        return self.max_new_tokens or task.max_new_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks)}

    def sample_key(self, task: str, models: dict[str, str], first_prompt: str) -> str:
        """What fixes one task's samples: a stored problem is reused only under the same key. The first
        problem's prompt stands for the prompt format and shots (the same under any limit)."""
        fixed = {"task": task, "prompt": first_prompt, "samples": self.task_samples(task),
                 "temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.new_tokens(sampling_task(task)),
                 "batch_size": self.batch_size, "seed": self.seed, "models": models}
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Draw:
    """The completions of one problem by one model, with the wall time and the tokens they took."""

    completions: list[str]
    seconds: float
    tokens: int


def _seed(*parts: object) -> int:
    """A seed from names, the same in every process and run (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")



def _cut(text: str, stop_strings: tuple[str, ...]) -> str:
    """``text`` up to its first stop string."""
    ends = [text.index(stop) for stop in stop_strings if stop in text]
    return text[: min(ends)] if ends else text


class StopAtStrings(StoppingCriteria):
    """Ends a row once its new text holds a stop string. It decodes the last few new tokens, which
    works for any tokenizer (transformers' ``StopStringCriteria`` fails on word-level vocabularies)."""

    TAIL_TOKENS = 16  # longer than any stop string in tokens

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_strings: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop_strings, self.prompt_length = tokenizer, stop_strings, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        start = max(self.prompt_length, input_ids.shape[1] - self.TAIL_TOKENS)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        return torch.tensor([any(stop in tail for stop in self.stop_strings) for tail in tails],
                            dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def draw_samples(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, count: int, *, seed: int,
    task: SamplingTask, settings: SamplingSettings, fork_prompts: bool | None = None,
) -> Draw:
    """``count`` sampled completions of ``prompt``, in calls of ``settings.batch_size``; the seed of each
    call derives from ``seed``. ``fork_prompts`` (linearized models only) turns forking on or off;
    None leaves the model's default."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = {pad, tokenizer.eos_token_id} - {None}
    extra = {} if fork_prompts is None else {"fork_prompts": fork_prompts}
    stop = StopAtStrings(tokenizer, task.stop_strings, ids.shape[1])
    completions, seconds, tokens = [], 0.0, 0
    for call, start in enumerate(range(0, count, settings.batch_size)):
        torch.manual_seed(_seed(seed, call))
        synchronize(device)
        started = time.perf_counter()
        output = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=settings.temperature,
            top_p=settings.top_p, top_k=0, num_return_sequences=min(settings.batch_size, count - start),
            max_new_tokens=settings.new_tokens(task), stopping_criteria=StoppingCriteriaList([stop]),
            pad_token_id=pad, **extra,
        )
        synchronize(device)
        seconds += time.perf_counter() - started
        for row in output[:, ids.shape[1]:].tolist():
            # A finished row is padded; its own tokens end with the first end token.
            length = next((i + 1 for i, token in enumerate(row) if token in ends), len(row))
            tokens += length
            completions.append(_cut(tokenizer.decode(row[:length], skip_special_tokens=True), task.stop_strings))
    return Draw(completions, seconds, tokens)


class SampleStore:
    """The finished problems of a run, one JSON line each, appended as they land.

    A line cut short by an interruption is dropped on opening, so appending stays valid.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, str, str], dict] = {}
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            complete = text[: text.rfind("\n") + 1]
            if complete != text:
                path.write_text(complete, encoding="utf-8")
            for line in complete.splitlines():
                record = json.loads(line)
                self.records[(record["key"], record["role"], record["problem"])] = record

    def get(self, key: str, role: str, problem: str) -> dict | None:
        return self.records.get((key, role, problem))

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())
        self.records[(record["key"], record["role"], record["problem"])] = record


def k_values(samples: int) -> list[int]:
    """1, 2, 4, ... up to ``samples``, and ``samples`` itself."""
    return sorted({2**i for i in range(int(math.log2(samples)) + 1)} | {samples})


def summarize(records: list[dict], samples: int, seed: int) -> dict:
    """Coverage, majority vote and seconds at each k, and the power-law fit, of one model on one task."""
    rng = random.Random(seed)
    points = []
    for k in k_values(samples):
        coverage = sum(pass_at_k(samples, sum(r["correct"]), k) for r in records) / len(records)
        majority = sum(majority_at_k(r["extracted"], r["answer"], k, MAJORITY_TRIALS, rng) for r in records)
        points.append({"k": k, "coverage": coverage, "majority": majority / len(records),
                       "seconds": sum(r["seconds"] for r in records) * k / samples})
    seconds = sum(r["seconds"] for r in records)
    return {
        "problems": len(records), "samples": samples, "points": points,
        "fit": fit_power_law([p["k"] for p in points], [p["coverage"] for p in points]),
        "seconds": seconds, "tokens": sum(r["tokens"] for r in records),
        "samples_per_second": len(records) * samples / seconds if seconds else None,
    }


def _estimate(seconds_per_draw: float, draws_left: int) -> str:
    total = seconds_per_draw * draws_left
    line = f"estimated ~{total / 60:.1f} more minutes for this task at the first problem's pace"
    if total > LONG_RUN_SECONDS:
        line += " (cut it with --limit or --samples; Ctrl-C keeps what was sampled, rerun to resume)"
    return line


def run_sampling(
    models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]], references: dict[str, str],
    settings: SamplingSettings, out_dir: Path, progress: bool = True,
    on_problem: Callable[[str, str, str], None] | None = None,
) -> dict:
    """Sample every task with every model, resuming from ``out_dir``; returns what ``sampling.json`` holds.

    ``references`` names each role's model (part of what makes stored samples reusable);
    ``on_problem(task, role, problem)`` is called after each new draw.
    """
    settings.validate()
    store = SampleStore(out_dir / SAMPLES_FILE)
    tasks = {}
    for name in settings.tasks:
        task, samples = sampling_task(name), settings.task_samples(name)
        problems: list[Problem] = task.problems(settings.task_limit(name), settings.seed)
        key = settings.sample_key(name, references, problems[0].prompt if problems else "")
        todo = [(p, role) for p in problems for role in models if store.get(key, role, p.key) is None]
        if progress:
            print(f"{name}: {len(problems)} problems x {samples} samples x <= {settings.new_tokens(task)} new tokens "
                  f"x {len(models)} models; {len(todo) * samples} samples to draw, "
                  f"{(len(problems) * len(models) - len(todo)) * samples} kept from an earlier run", flush=True)
        bar = tqdm(total=len(todo) * samples, desc=name, unit="sample", disable=not progress or not todo)
        first: dict[str, float] = {}  # seconds of each model's first draw, for the estimate
        for model, tokenizer in models.values() if todo else ():  # first calls allocate: keep them out of the seconds
            draw_samples(model, tokenizer, todo[0][0].prompt, 1, seed=0, task=task,
                         settings=replace(settings, max_new_tokens=2))
        for done, (problem, role) in enumerate(todo):
            model, tokenizer = models[role]
            draw = draw_samples(model, tokenizer, problem.prompt, samples, seed=_seed(settings.seed, problem.key),
                                task=task, settings=settings)
            extracted = [task.extract(text) for text in draw.completions]
            store.add({
                "key": key, "task": name, "role": role, "problem": problem.key, "answer": problem.answer,
                "completions": draw.completions, "extracted": extracted,
                "correct": [answer == problem.answer for answer in extracted],
                "seconds": draw.seconds, "tokens": draw.tokens,
            })
            bar.update(samples)
            if on_problem is not None:
                on_problem(name, role, problem.key)
            first.setdefault(role, draw.seconds)
            if progress and done + 1 == len(models) and len(todo) > done + 1:
                bar.write(_estimate(sum(first.values()) / len(first), len(todo) - done - 1))
        bar.close()
        per_role = {
            role: summarize([store.get(key, role, p.key) for p in problems], samples, _seed(settings.seed, name))
            for role in models
        }
        if "teacher" in per_role and "student" in per_role:
            curve = {role: [(p["seconds"], p["coverage"]) for p in per_role[role]["points"]]
                     for role in ("teacher", "student")}
            per_role["crossing"] = crossings(curve["teacher"], curve["student"])
        tasks[name] = per_role
    return {"settings": {**settings.to_dict(), **machine_settings(next(iter(models.values()))[0])}, "models": references, "tasks": tasks}
