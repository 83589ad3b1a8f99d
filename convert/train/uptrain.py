"""The recipe runner: convert (if needed), distil the student from the frozen source, stage by
stage, with resumable checkpoints, metrics, a plot, and a stock final checkpoint with a model card.

The same function runs under ``kvsurgeon uptrain`` and ``accelerate launch scripts/uptrain.py``;
accelerate handles devices, DDP/FSDP and mixed precision, so nothing here is a launcher.

``Uptrainer.run`` loads teacher and student, finds the resume point (``_resume_point``) and runs
the stages (``_train_stages`` -> ``_train_stage`` per stage -> ``_optimiser_step`` and
``_after_step`` per step: logging, checkpoints, evals), sharing its state through ``_Run``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvsurgeon.attention.kv_cache import kv_bytes_at_context, kv_bytes_per_token

from ..io.checkpoint import read_config
from .distill import PackedStream, answer_mask, answer_weights, distill_loss, window_digests
from ..errors import KvSurgeonError
from .console import eval_line, passkey_line
from .metrics_plot import plot_metrics
from .kernels import Availability, KernelRecorder, attn_implementation, check_fused, report_rows, require_fused, resolve
from .precision import ACCELERATE, detect_precision
from .recipe import OptimCfg, Recipe, StageCfg
from .retrieval_check import layer_choice_hint, passkey_check_options, passkey_warning
from .tied_weights import quiet_tied_notice, tied_output_names
from ..io.resolve import resolve_model
from ..io.writer import atomic_output

# run state next to accelerate's save_state files: plain JSON and safetensors, nothing to unpickle
PROGRESS_FILE = "progress.json"
SEEN_FILE = "seen_windows.safetensors"
RECIPE_FILE = "recipe.json"  # the recipe that trained up to this checkpoint, checked on resume
# recipe keys a resume may change: where and how often it saves, evaluates and stops, and which
# kernels compute the same function; everything else decides what is trained on and how
RESUME_FREE = frozenset({"output", "eval_every", "eval_passkey", "save_every", "keep_checkpoints", "push_to_hub", "max_steps",
                         "kernels", "hardware", "gradient_checkpointing", "memory_check", "data.eval", "data.eval_split", "data.eval_tokens",
                         "data.streaming"})


def recipe_snapshot(r: Recipe) -> dict:
    """The recipe as flat ``dotted.key -> JSON value`` pairs (stages as one list value)."""
    flat: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k in ("data", "optim", "distill"):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(json.loads(json.dumps(asdict(r), default=str)), "")
    return flat


def resume_changes(saved: dict, now: dict) -> list[str]:
    """Keys whose value differs between the checkpoint's recipe and this one, except the free ones."""
    def unlabelled(k: str, v):
        # stage names only label the metrics and the card, so a run whose unnamed stages were all
        # 'end_to_end' (before 2026-12-06) resumes under today's numbered names
        return [{f: x for f, x in s.items() if f != "name"} for s in v] if k == "stages" and isinstance(v, list) else v

    keys = sorted((saved.keys() | now.keys()) - RESUME_FREE)
    return [f"{k}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in keys
            if unlabelled(k, saved.get(k)) != unlabelled(k, now.get(k))]


@dataclass
class Progress:
    stage: int = 0
    stage_step: int = 0  # optimiser steps done in the current stage
    global_step: int = 0
    windows: int = 0  # data position: global windows consumed by all processes together
    tokens: int = 0  # global: summed over processes
    processes: int = 0  # the world size that wrote it (0: a checkpoint from before this was recorded)

    @classmethod
    def read(cls, ck: Path) -> "Progress":
        d = json.loads((ck / PROGRESS_FILE).read_text())
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# ---- pieces ------------------------------------------------------------------------------------
def new_module_markers(config: dict) -> tuple[str, ...]:
    """Name fragments of the modules a conversion created (what ``trainable: new`` trains)."""
    mt = config.get("model_type")
    if mt == "granitemoehybrid":
        return (".mamba.",)
    if mt in ("qwen3_next", "qwen3_5", "qwen3_5_text"):
        return (".linear_attn.",)
    return (".self_attn.",)


def select_trainable(model, stage: StageCfg, config: dict):
    """Freeze everything but the stage's trainable set; LoRA wraps the model with peft."""
    if stage.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        cfg = LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha, target_modules=stage.lora_targets, lora_dropout=0.0)
        return get_peft_model(model, cfg)
    markers = {
        "all": ("",),
        "attention": (".self_attn.", ".mamba.", ".linear_attn."),
        "new": new_module_markers(config),
    }[stage.trainable]
    n = 0
    for name, p in model.named_parameters():
        on = any(m in f".{name}" for m in markers)
        p.requires_grad_(on)
        n += on
    if n == 0:
        raise KvSurgeonError(f"stage {stage.name!r}: trainable={stage.trainable!r} selects no parameters in this model")
    return model


def make_scheduler(opt, total: int, warmup: int, schedule: str, min_ratio: float):
    """The recipe's schedule from transformers' own: cosine and linear decay to ``min_ratio`` of the peak."""
    from transformers import get_scheduler

    if schedule == "cosine":
        return get_scheduler("cosine_with_min_lr", opt, warmup, total, scheduler_specific_kwargs={"min_lr_rate": min_ratio})
    if schedule == "linear":  # warmup-stable-decay with no stable phase is linear decay to a floor
        kw = {"num_stable_steps": 0, "num_decay_steps": max(1, total - warmup), "decay_type": "linear", "min_lr_ratio": min_ratio}
        return get_scheduler("warmup_stable_decay", opt, warmup, total, scheduler_specific_kwargs=kw)
    return get_scheduler("constant_with_warmup", opt, warmup, total)


def stage_scheduler(opt, optim: OptimCfg, steps: list[int], si: int):
    """Stage si's schedule: over its own ``steps[si]`` (span "stage"), or its slice of one schedule
    over every stage's steps (span "run"), starting where the stages before it stopped."""
    if optim.schedule_span == "stage":
        return make_scheduler(opt, steps[si], optim.warmup_steps, optim.schedule, optim.min_lr_ratio)
    # the run's multiplier, read off transformers' schedule on a throwaway optimiser
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    whole = make_scheduler(probe, sum(steps), optim.warmup_steps, optim.schedule, optim.min_lr_ratio).lr_lambdas[0]
    offset = sum(steps[:si])

    def multiplier(step: int) -> float:  # a plain function: LambdaLR's state_dict stores none of it
        return whole(step + offset)

    return torch.optim.lr_scheduler.LambdaLR(opt, multiplier)


def stage_lengths(recipe: Recipe, steps: list[int], processes: int):
    """The window length at each global window index: stage by stage, ``steps[i]`` optimiser steps of
    ``batch_size x grad_accum x processes`` windows each (the last stage's length beyond the end)."""
    per_step = recipe.batch_size * recipe.grad_accum * processes
    ends, total = [], 0
    for n in steps:
        total += n * per_step
        ends.append(total)
    lengths = [recipe.stage_seq_len(s) for s in recipe.stages]

    def seq_len_at(index: int) -> int:
        for end, n in zip(ends, lengths):
            if index < end:
                return n
        return lengths[-1]

    return seq_len_at


# ---- the runner --------------------------------------------------------------------------------
def _without_tied(state: dict) -> tuple[dict, set[str]]:
    """A state dict with each shared tensor once (tied embeddings: lm_head is embed_tokens), and the
    names left out. safetensors refuses to store two names for one memory."""
    seen, kept, dropped = set(), {}, set()
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            dropped.add(name)
            continue
        seen.add(key)
        kept[name] = t
    return kept, dropped


class Uptrainer:
    def __init__(self, recipe: Recipe, recipe_text: str = "", progress: bool = True):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        self.r = recipe
        self.recipe_text = recipe_text
        self.progress = progress
        self.tied_names: set[str] = set()  # the student's tied output embedding, which checkpoints store once
        self.out = Path(recipe.output)
        # Several processes on a machine without GPUs (torchrun, `accelerate launch --multi_gpu`) must ask
        # for CPU explicitly, else accelerate gives every process DistributedType.NO and rank 0.
        # step_scheduler_with_optimizer=False: accelerate would otherwise step a prepared scheduler
        # num_processes times per optimiser step (it assumes a sharded epoch length); ours counts steps.
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        # auto: bf16 where the device computes it natively, fp32 elsewhere (an AVX2-only CPU runs bf16 matmuls 33-65x slower)
        self.precision, slow = detect_precision(recipe.precision)
        if slow:
            warnings.warn(slow, stacklevel=2)
        if not multi:
            # One process may run several uptrains (a notebook, the tests) in different precisions:
            # accelerate keeps one global state and refuses to change its mixed precision, so a
            # single-process run starts from a fresh one (the distributed part stays: none here).
            AcceleratorState._reset_state()
        self.acc = Accelerator(mixed_precision=ACCELERATE[self.precision], gradient_accumulation_steps=1,
                               cpu=multi and not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
        if multi and self.acc.num_processes == 1:
            raise KvSurgeonError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate set up one; "
                                 "set ACCELERATE_USE_CPU=1 on a machine without GPUs")
        # resolved once: auto -> fused on CUDA, torch otherwise (fused without CUDA raises here)
        self.avail = Availability.detect()
        self.kernel_mode = resolve(recipe.kernels, self.avail)
        self.kernels: KernelRecorder | None = None
        self.kernel_rows: list[dict] = []  # the student's, for the model card
        self.seen: dict[int, int] = {}  # digest -> length of the windows trained on (main process), for distinct_tokens
        self.metrics_file = self.out / "metrics.jsonl"
        self.ckpt_dir = self.out / "checkpoints"

    # -- setup --
    def student_folder(self) -> Path:
        if self.r.student:
            return resolve_model(self.r.student)
        folder = self.out / "converted"
        if not (folder / "config.json").is_file():
            if self.acc.is_main_process:
                self.convert(folder)
            self.acc.wait_for_everyone()
        return folder

    def convert(self, folder: Path) -> None:
        from ..pipeline.spec import run_conversion
        from ..pipeline.driver import ConvertOptions

        spec = self.r.conversion
        run_conversion(self.r.source, spec, ConvertOptions(out=folder, progress=self.progress, measure="off"), recipe=self.recipe_text)

    def load(self, folder: Path, trainable: bool):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=torch.float32,
            attn_implementation=attn_implementation(self.r.kernels, self.avail, config),
        )
        if trainable and self.r.gradient_checkpointing:
            # transformers renamed it (the old name warns from 5.2x and goes in v6)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model.train(trainable)
        if not trainable:
            model.requires_grad_(False)
        return model

    # -- checkpoints --
    def save_checkpoint(self, prog: Progress) -> Path:
        """Every process calls this: accelerate's save_state gathers an FSDP model collectively and each
        rank writes its own RNG state. Written to a temporary folder and renamed when complete, so a run
        killed mid-save leaves the previous checkpoint as the newest."""
        from safetensors.torch import save_file

        acc = self.acc
        target = self.ckpt_dir / f"step-{prog.global_step:07d}"
        tmp = self.ckpt_dir / f".tmp-{target.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        with quiet_tied_notice(self.tied_names):
            acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / PROGRESS_FILE).write_text(json.dumps(asdict(prog)) + "\n")
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe_snapshot(self.r), indent=1) + "\n")
            digests = sorted(self.seen)
            save_file({"digests": torch.tensor(digests, dtype=torch.int64),
                       "lengths": torch.tensor([self.seen[d] for d in digests], dtype=torch.int64)}, str(tmp / SEEN_FILE))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
            for old in sorted(self.ckpt_dir.glob("step-*"))[: -self.r.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return target

    def latest_checkpoint(self) -> Path | None:
        ck = sorted(c for c in self.ckpt_dir.glob("step-*") if (c / PROGRESS_FILE).is_file()) if self.ckpt_dir.is_dir() else []
        return ck[-1] if ck else None

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop rows a killed run logged after its last checkpoint: they are trained again."""
        if self.acc.is_main_process and self.metrics_file.exists():
            rows = [l for l in self.metrics_file.read_text().splitlines() if l.strip()]
            self.metrics_file.write_text("".join(l + "\n" for l in rows if json.loads(l).get("step", 0) <= step))
        self.acc.wait_for_everyone()

    def log(self, row: dict) -> None:
        if self.acc.is_main_process:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")

    def say(self, line: str) -> None:
        """A line on the console from the main process, above the progress bar when there is one."""
        if self.acc.is_main_process:
            tqdm.write(line)

    # -- eval --
    @contextmanager
    def scoring(self, student):
        """The student in eval mode under the run's autocast, then back in the mode it was in."""
        was = student.training
        student.eval()
        try:
            with self.acc.autocast():
                yield
        finally:
            student.train(was)

    def evaluate(self, student, teacher, folder: Path, prog: Progress, stage: str):
        if not self.r.data.eval:
            return None
        from ..evaluation.perplexity import evaluate

        with self.scoring(student):
            res = evaluate(
                str(folder), self.r.data.eval, reference=self.r.source, max_tokens=self.r.data.eval_tokens,
                seq_len=self.r.data.seq_len, split=self.r.data.eval_split, text_field=self.r.data.text_field,
                progress=False, model=self.acc.unwrap_model(student), reference_model=teacher,
            )
        row = {"kind": "eval", "stage": stage, "step": prog.global_step, "tokens": prog.tokens, "ppl": res.ppl,
               "reference_ppl": res.reference_ppl, "kl": res.kl, "top1_agreement": res.top1_agreement, "eval_tokens": res.tokens}
        self.log(row)
        self.say(eval_line(row, self.r.data.eval))
        return row

    def passkey_check(self, student, teacher, tok, prog: Progress, folder: Path) -> list[dict]:
        """The retrieval check (retrieval_check.py), run by every process as the ppl eval is; returns the
        source's and the student's results for the model card, and warns when retrieval collapsed."""
        if self.passkey_opts is None:
            return []
        from ..evaluation.long_context import measure_long_context

        t0 = time.time()
        with self.scoring(student):
            src, got = (measure_long_context(m, tok, self.passkey_opts, name, progress=False)
                        for m, name in ((teacher, "source"), (self.acc.unwrap_model(student), "after uptraining")))
        (length, hit), = got.passkey_by_length.items()
        row = {"kind": "passkey", "step": prog.global_step, "tokens": prog.tokens, "length": int(length),
               "prompts": len(got.samples["passkey"]), "accuracy": hit, "reference_accuracy": src.passkey_by_length[length],
               "logprob": got.passkey_logprob_by_length[length], "reference_logprob": src.passkey_logprob_by_length[length],
               "seconds": time.time() - t0}
        self.log(row)
        self.say(passkey_line(row))
        if (warning := passkey_warning(src, got, str(self.out / "final"), self.r.source, layer_choice_hint(folder))) \
                and self.acc.is_main_process:
            warnings.warn(warning, stacklevel=2)
        return [src.as_dict(), got.as_dict()]

    # -- main loop --
    def run(self, resume: bool = False) -> Path:
        from transformers import AutoTokenizer

        r, acc = self.r, self.acc
        if self.out.exists() and not resume and any(self.out.iterdir()) and (self.ckpt_dir.exists() or (self.out / "final").exists()):
            raise KvSurgeonError(f"{self.out} already holds a run; pass --resume to continue it, or choose another output")
        if resume:
            self._check_resume()
        src = resolve_model(r.source)
        # before anything is written: a passkey check asked for at a length too short for one is refused here
        self.passkey_opts = passkey_check_options(r, AutoTokenizer.from_pretrained(src))
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(r.seed)
        random.seed(r.seed)
        folder = self.student_folder()
        tok = AutoTokenizer.from_pretrained(folder)
        require_fused(r.kernels, [read_config(folder), read_config(src)], self.avail)
        teacher = self.load(src, trainable=False)
        teacher = acc.prepare_model(teacher, evaluation_mode=True)
        student_base = self.load(folder, trainable=True)
        memory = self._check_memory(student_base, run_config := read_config(folder))
        prog, ck = self._resume_point(resume)
        if memory is not None:
            self.log({"kind": "memory", "step": prog.global_step, **memory})
        prog.processes = acc.num_processes  # _check_resume refused any other count
        steps = r.stage_steps(acc.num_processes)
        stream = PackedStream(tok, r.data.train, stage_lengths(r, steps, acc.num_processes), r.batch_size, r.data.text_field,
                              r.data.split, rank=acc.process_index, world=acc.num_processes, retrieval=r.data.retrieval,
                              seed=r.seed, retrieval_far=r.data.retrieval_far,
                              retrieval_asks=r.data.retrieval_asks, retrieval_facts=r.data.retrieval_facts)
        total = sum(steps) if r.max_steps is None else min(sum(steps), r.max_steps)
        bar = tqdm(total=total, initial=prog.global_step, desc="uptrain", unit="step", disable=not (self.progress and acc.is_main_process))
        run = _Run(teacher=teacher, folder=folder, config=run_config, stream=stream,
                   batches=stream.batches_with_answers(skip_windows=prog.windows), steps=steps, bar=bar, prog=prog, ck=ck)
        self.kernels = KernelRecorder(self.kernel_mode, [student_base, teacher]).install()
        try:
            student_base = self._train_stages(run, student_base)
        except KeyboardInterrupt:
            bar.close()
            self._interrupted(prog)
        finally:
            self.kernels.remove()
        bar.close()
        if prog.stage < len(r.stages):  # stopped by max_steps: leave a checkpoint to resume from
            return self._checkpoint_now(prog)
        with KernelRecorder(self.kernel_mode, [student_base, teacher]):  # the final eval runs the same paths
            final = self.finish(student_base, teacher, folder, run.config, prog, tok)
        if acc.is_main_process:
            plot_metrics(self.metrics_file, self.out / "metrics.png")
        return final

    def _check_memory(self, student, config: dict) -> dict | None:
        """On CPU, before training: refuse a run whose step cannot fit in the host memory left (the
        kernel would kill it minutes in, with no message); warn when it may not. Returns the estimate
        for metrics.jsonl."""
        from . import memory as mem

        r, acc = self.r, self.acc
        if acc.device.type != "cpu" or not r.memory_check:
            return None
        loaded = mem.process_rss()
        stage = max(r.stages, key=r.stage_seq_len)  # the longest windows cost the most
        n = r.stage_seq_len(stage)
        flags = [p.requires_grad for p in student.parameters()]
        select_trainable(student, stage if stage.trainable != "lora" else replace(stage, trainable="attention"), config)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        vocab = student.get_input_embeddings().num_embeddings

        def step(length: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(0)  # its own: the run's seeded RNG stream stays untouched
            ids = torch.randint(0, vocab, (1, length), generator=g)
            with acc.autocast():
                s_logits = student(input_ids=ids).logits
                t_logits = torch.randn(s_logits.shape, generator=g).to(s_logits.dtype)
            return distill_loss(s_logits, t_logits, ids, r.distill.temperature, r.distill.kl_weight, r.distill.ce_weight)[0]

        lengths = mem.probe_lengths(n)
        try:
            probes = mem.probe(student, step, lengths)
        finally:
            for p, f in zip(student.parameters(), flags):
                p.requires_grad_(f)
        est = {ck: mem.estimate_step(probes, n, r.batch_size, trainable, ck, lengths) for ck in (False, True)}
        procs = mem.local_processes()
        need = est[r.gradient_checkpointing].floor * procs
        avail = mem.host_memory_available()
        fits = torch.tensor([1.0 if avail is None or need <= avail else 0.0], device=acc.device)
        if acc.num_processes > 1:  # every rank refuses, or none does
            fits = acc.reduce(fits, reduction="mean")
        e = est[r.gradient_checkpointing]
        what = (f"a step on {n:,}-token windows (batch_size {r.batch_size}, stage {stage.name!r}) needs at least "
                f"{mem.gib(e.floor)} beyond the loaded models (saved activations {mem.gib(e.activations)}, AdamW "
                f"{mem.gib(e.optimizer)}) x {procs} process(es), and {mem.gib(avail or 0)} is available")
        fix = (f"set gradient_checkpointing: true (at least {mem.gib(est[True].floor * procs)}), or "
               if not r.gradient_checkpointing else "") + "lower seq_len or batch_size"
        if fits.item() < 1.0:
            raise KvSurgeonError(f"uptrain cannot fit in memory: {what}; {fix} (memory_check: false runs it anyway)")
        if avail is not None and 2 * need > avail and acc.is_main_process:
            # transients and the allocator come on top of the floor (measured up to ~1.9x): a kill without a message
            warnings.warn(f"uptrain may run out of memory: {what}; peaks measured up to ~2x that. If it is killed, {fix}",
                          stacklevel=2)
        return {"seq_len": n, "batch_size": r.batch_size, "floor_bytes": e.floor,
                "floor_bytes_checkpointed": est[True].floor, "floor_bytes_plain": est[False].floor, "available_bytes": avail,
                "loaded_rss_bytes": loaded}

    def _resume_point(self, resume: bool) -> tuple[Progress, Path | None]:
        """Progress and the checkpoint to continue from (a fresh start: none)."""
        from safetensors.torch import load_file

        ck = self.latest_checkpoint() if resume else None
        if ck is None:
            if resume:
                raise KvSurgeonError(f"--resume: no checkpoint under {self.ckpt_dir}")
            return Progress(), None
        prog = Progress.read(ck)
        if self.acc.is_main_process:
            seen = load_file(str(ck / SEEN_FILE))
            lengths = seen["lengths"].tolist() if "lengths" in seen else [self.r.data.seq_len] * seen["digests"].numel()
            self.seen = dict(zip(seen["digests"].tolist(), lengths))
        self._truncate_metrics(prog.global_step)
        return prog, ck

    def _check_resume(self) -> None:
        """Before anything loads or is written: a resume continues the run its checkpoint belongs to,
        so another process count, other data, seeds or optimiser settings are refused instead of silently
        mixed in."""
        ck = self.latest_checkpoint()
        if ck is None:  # _resume_point says so
            return
        n = Progress.read(ck).processes
        if n and n != self.acc.num_processes:
            # steps, the rank split of the data, each rank's RNG and any sharded state follow the world size
            raise KvSurgeonError(f"--resume: {ck} was written by {n} process(es), this is {self.acc.num_processes}; "
                                 f"resume with {n} (e.g. accelerate launch --num_processes {n} ...)")
        if not (ck / RECIPE_FILE).is_file():  # older checkpoints carry no recipe
            return
        changed = resume_changes(json.loads((ck / RECIPE_FILE).read_text()), recipe_snapshot(self.r))
        if changed:
            raise KvSurgeonError(f"--resume: the recipe differs from the one that wrote {ck}:\n  " + "\n  ".join(changed)
                                 + f"\nresume with that recipe (only {', '.join(sorted(RESUME_FREE))} may change), "
                                 "or start a new run in another output folder")

    def _interrupted(self, prog: Progress) -> None:
        """Ctrl-C: save a checkpoint (one process) and say how to resume."""
        if self.acc.num_processes > 1:
            # each rank is interrupted at its own point (one inside a gather, one not): a collective
            # save now could pair mismatched collectives and hang, so keep the last periodic checkpoint
            last = self.latest_checkpoint()
            raise KvSurgeonError(f"interrupted: continue with --resume from {last or 'the start (no checkpoint yet)'}") from None
        path = self._checkpoint_now(prog)
        raise KvSurgeonError(f"interrupted: checkpoint saved to {path}; continue with --resume") from None

    def _checkpoint_now(self, prog: Progress) -> Path:
        """A checkpoint at this step: the one already written here if there is one (a stage's end always
        is). Between stages that one is consistent whenever the stop comes, even before the next stage's
        optimiser exists."""
        last = self.latest_checkpoint()
        if last is not None and Progress.read(last).global_step == prog.global_step:
            return last
        return self.save_checkpoint(prog)

    def _train_stages(self, run: "_Run", student_base):
        """Every remaining stage from the progress point; returns the student (LoRA merged after each
        completed stage). Stops early at ``max_steps``."""
        prog = run.prog
        for si in range(prog.stage, len(self.r.stages)):
            model, done = self._train_stage(run, si, student_base)
            if not done:
                break  # max_steps reached
            # stage complete: fold LoRA into the weights so the next stage starts from a plain model
            student_base = self._unwrap_merged(model)
            prog.stage, prog.stage_step = si + 1, 0
        return student_base

    def _train_stage(self, run: "_Run", si: int, student_base):
        """Stage si: its trainable set, optimiser and schedule, then its steps. Returns the prepared
        model and whether the stage ran to its end."""
        r, acc, prog = self.r, self.acc, run.prog
        stage = r.stages[si]
        # drop the previous stage's (and the teacher's) registrations: save_state then holds
        # exactly this stage's student, optimiser and schedule
        acc.free_memory()
        model = select_trainable(student_base, stage, run.config)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=stage.lr or r.optim.lr, betas=tuple(r.optim.betas), weight_decay=r.optim.weight_decay)
        sched = stage_scheduler(opt, r.optim, run.steps, si)
        model, opt, sched = acc.prepare(model, opt, sched)
        self.tied_names = tied_output_names(model)  # as this stage's checkpoints name it (a LoRA or DDP prefix)
        if prog.global_step == 0 and run.ck is None and si == 0:
            # after prepare: the student is on the accelerator's device (sharded under FSDP)
            self.evaluate(model, run.teacher, run.folder, prog, "after conversion")
        if run.ck is not None and si == prog.stage:
            self._restore(run.ck)
            run.ck = None  # consumed: the next stage starts from this one's weights, not the checkpoint's
        params = [p for p in model.parameters() if p.requires_grad]
        start = prog.stage_step if si == prog.stage else 0
        for _ in range(start, run.steps[si]):
            if r.max_steps is not None and prog.global_step >= r.max_steps:
                return model, False
            t0 = time.time()
            if not self.kernel_rows:  # report what training reached, not the eval before it
                self.kernels.called.clear()
            lr = sched.get_last_lr()[0]  # what this step uses: sched.step() below moves it to the next step's
            losses = self._optimiser_step(run, model, opt, sched, params)
            self._after_step(run, stage, model, student_base, lr, losses, time.time() - t0)
        return model, True

    def _optimiser_step(self, run: "_Run", model, opt, sched, params) -> list[float | None]:
        """One optimiser step over ``grad_accum`` batches of distillation; returns the (loss, kl, ce)
        means over processes, then the answer tokens' mean CE (None without retrieval windows), and
        counts the windows every process trained on."""
        r, acc = self.r, self.acc
        sums = torch.zeros(5, device=acc.device)  # loss, kl, ce means; answer CE summed over answer tokens, their count
        digests = []
        d = r.distill
        weighted = d.answer_weight != 1.0 or d.lead_weight is not None  # else the plain mean, no weights
        for _ in range(r.grad_accum):
            ids, answers = next(run.batches)
            digests.append(window_digests(ids))
            weights = answer_weights(ids.shape, answers, d.answer_weight, d.lead_weight).to(acc.device) if weighted else None
            mask = answer_mask(ids.shape, answers).to(acc.device) if r.data.retrieval else None
            ids = ids.to(acc.device)
            with acc.autocast():
                with torch.no_grad():
                    t_logits = run.teacher(input_ids=ids).logits
                s_logits = model(input_ids=ids).logits
            out = distill_loss(s_logits, t_logits, ids, d.temperature, d.kl_weight, d.ce_weight,
                               token_weights=weights, answer_mask=mask, answer_ce_weight=d.answer_ce)
            acc.backward(out.loss / r.grad_accum)
            sums += torch.stack([out.loss.detach() / r.grad_accum, out.kl / r.grad_accum, out.ce / r.grad_accum,
                                 out.answer_ce * out.answer_tokens, out.answer_tokens])
        if r.optim.grad_clip:
            acc.clip_grad_norm_(params, r.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        # the logged loss is the mean over processes (= one process with the global batch);
        # the digests of every process's windows count the distinct data actually trained on
        loss, kl, ce, ans_sum, ans_n = acc.reduce(sums, reduction="mean").tolist()
        losses = [loss, kl, ce, ans_sum / ans_n if ans_n else None]  # the mean over every process's answer tokens
        all_digests = acc.gather(torch.cat(digests).to(acc.device)).tolist()
        if acc.is_main_process:
            self.seen.update(dict.fromkeys(all_digests, ids.shape[1]))
        return losses

    def _after_step(self, run: "_Run", stage: StageCfg, model, student_base, lr: float, losses: list[float | None], dt: float) -> None:
        """Advance the progress, log the step (and the kernels once), checkpoint and evaluate on cadence."""
        r, acc, prog = self.r, self.acc, run.prog
        loss_v, kl_v, ce_v, answer_ce_v = losses
        prog.stage_step += 1
        prog.global_step += 1
        prog.windows = run.stream.position
        step_tokens = r.tokens_per_step(stage) * acc.num_processes  # distinct windows per process, so this is true
        prog.tokens += step_tokens
        tps = step_tokens / dt
        self.log({"kind": "train", "stage": stage.name, "step": prog.global_step, "tokens": prog.tokens,
                  "seq_len": r.stage_seq_len(stage), "distinct_tokens": sum(self.seen.values()), "loss": loss_v,
                  "kl": kl_v, "ce": ce_v, "answer_ce": answer_ce_v, "lr": lr, "tokens_per_s": tps, "processes": acc.num_processes})
        if not self.kernel_rows:
            self._log_kernels(student_base, run.teacher, prog)
        run.bar.update(1)
        run.bar.set_postfix(stage=stage.name, loss=f"{loss_v:.3f}", kl=f"{kl_v:.3f}", tok_s=f"{tps:.0f}")
        # and at every stage's end: a run stopped between stages (at any moment of the switch) resumes
        # from there into a fresh next stage
        if prog.global_step % r.save_every == 0 or prog.stage_step == run.steps[prog.stage]:
            self.save_checkpoint(prog)
        if r.eval_every and prog.global_step % r.eval_every == 0:
            self.evaluate(model, run.teacher, run.folder, prog, stage.name)

    def _log_kernels(self, student, teacher, prog: Progress) -> None:
        """After the first step: the kernel each layer type's forward reached, into metrics.jsonl (and
        later the card); kernels: fused fails here if any layer type ran a PyTorch path."""
        s_rows, t_rows = self.kernels.report(student), self.kernels.report(teacher)
        self.kernel_rows = report_rows(s_rows)
        self.log({"kind": "kernels", "step": prog.global_step, "tokens": prog.tokens, "choice": self.r.kernels,
                  "precision": self.r.precision, "precision_resolved": self.precision,
                  "resolved": self.kernel_mode, "student": self.kernel_rows, "teacher": report_rows(t_rows)})
        check_fused(self.r.kernels, s_rows, "student")
        check_fused(self.r.kernels, t_rows, "teacher")

    def _restore(self, ck: Path) -> None:
        """accelerate's load_state: weights (safetensors), optimiser, schedule and this rank's RNG, all
        read with torch.load(weights_only=True)."""
        # model file names depend on the mode (model.safetensors; pytorch_model_fsdp* under FSDP); the
        # old hand-written format kept a pickled trainer_state.pt, which is not read any more
        if (ck / "trainer_state.pt").exists() or not (ck / "scheduler.bin").is_file():
            raise KvSurgeonError(f"checkpoint {ck} is not an accelerate save_state folder (written by an older kvsurgeon?); "
                                 "start a new run")
        try:
            self.acc.load_state(str(ck))
        except RuntimeError as e:  # load_state_dict's mismatch report
            raise KvSurgeonError(f"checkpoint {ck} does not match this recipe's model ({str(e)[:300]}); "
                                 "resume with the recipe that wrote it") from None

    def _unwrap_merged(self, model):
        m = self.acc.unwrap_model(model)
        if hasattr(m, "merge_and_unload"):
            m = m.merge_and_unload()
        return m

    def finish(self, student, teacher, folder: Path, config: dict, prog: Progress, tok) -> Path:
        from ..hub.model_card import CONTEXT_TOKENS, CardInfo, FidelityRow, read_card_info, write_model_card
        from ..io.writer import copy_extras

        after = self.evaluate(student, teacher, folder, prog, "after uptraining")
        long_context = self.passkey_check(student, teacher, tok, prog, folder)
        target = self.out / "final"
        if self.acc.is_main_process:
            rows = [json.loads(l) for l in self.metrics_file.read_text().splitlines()] if self.metrics_file.exists() else []
            evals = [x for x in rows if x.get("kind") == "eval"]
            fid = []
            for e, label in ((evals[0] if evals else None, "after conversion"), (after, "after uptraining")):
                if e:
                    fid.append(FidelityRow(stage=label, data=str(self.r.data.eval), tokens=e["eval_tokens"], ppl=e["ppl"],
                                           reference_ppl=e["reference_ppl"], kl=e["kl"], top1_agreement=e["top1_agreement"]))
            base = read_card_info(folder)
            src_cfg = read_config(resolve_model(self.r.source))
            info = CardInfo(
                base_model=self.r.source,
                conversion=base.conversion if base else (self.r.conversion.to if self.r.conversion else "none"),
                summary=(base.summary if base else "") + f" Then uptrained on {prog.tokens:,} tokens of {self.r.data.train} "
                f"by distillation from the source (stages: {', '.join(s.name for s in self.r.stages)}).",
                command=base.command if base else None,
                recipe=self.recipe_text or None,
                license=base.license if base else None,
                kv_bytes_per_token_before=kv_bytes_per_token(src_cfg),
                kv_bytes_per_token_after=kv_bytes_per_token(config),
                kv_bytes_at_context_before=kv_bytes_at_context(src_cfg, CONTEXT_TOKENS),
                kv_bytes_at_context_after=kv_bytes_at_context(config, CONTEXT_TOKENS),
                fidelity=fid,
                long_context=long_context,
                training_kernels=self.kernel_rows,
            )
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(config.get("dtype")), torch.float32)
        # every process: under FSDP this gathers the full weights (a collective); DDP/one process: a plain state_dict
        state = self.acc.get_state_dict(student)
        if self.acc.is_main_process:
            with atomic_output(target, overwrite=True) as tmp:
                self.acc.unwrap_model(student).save_pretrained(tmp, state_dict={k: v.to(dtype) for k, v in state.items()})
                copy_extras(folder, tmp)
                write_model_card(tmp, info)
        self.acc.wait_for_everyone()
        if self.r.push_to_hub and self.acc.is_main_process:
            from ..hub.model_card import refresh_model_card
            from ..hub.publish import push_folder

            push_folder(target, self.r.push_to_hub, refresh_card=refresh_model_card)
        return target


def uptrain(recipe: Recipe, recipe_text: str = "", resume: bool = False, progress: bool = True) -> Path:
    return Uptrainer(recipe, recipe_text, progress).run(resume=resume)


@dataclass
class _Run:
    """What one ``Uptrainer.run`` shares between its stages and steps."""

    teacher: object
    folder: Path
    config: dict
    stream: PackedStream
    batches: object  # iterator of ((batch, seq_len) token windows, their answer spans)
    steps: list[int]  # optimiser steps per stage
    bar: object  # tqdm
    prog: "Progress"
    ck: Path | None  # the checkpoint to resume from, until its stage has restored it
