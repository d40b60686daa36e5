"""The training loop, method-agnostic: it checks everything before the first step, trains the student
and its EMA teacher with the step of cfg.method (methods/), evaluates the teacher each epoch, and
writes checkpoints from which a run resumes bit for bit on CPU, also under DDP (torchrun). What a
run writes and why it is deterministic: docs/methods.md."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from .. import models
from . import checkpoint, data, methods, visualize
from .config import TrainConfig
from .errors import UserError
from .evaluate import evaluate, pseudo_label_quality, write_results


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    """The network of cfg.method (methods/), 2 classes, randomly initialised (Trainer loads
    --pretrained). It takes (B, 1, H, W) grayscale in [0, 1] whatever `in_channels` is: with 3 it
    replicates the gray channel and normalises with the ImageNet mean/std inside its forward
    (models/inputs.py), so evaluation, prediction and an exported model need no extra step."""
    return methods.get(cfg.method).build_model(cfg)


def resnets(model: torch.nn.Module) -> list:
    """The ResNet backbones of a network built by build_model (SemiSeg-CAW has two)."""
    return [m for m in model.modules() if isinstance(m, models.ResNet)]


def load_pretrained(model: torch.nn.Module, path: str) -> list:
    """Load a local ImageNet state dict into every ResNet backbone of `model` (the stem kernel
    adapted to its input channels); a missing or unfit file is a UserError naming --pretrained."""
    reports = []
    for net in resnets(model):
        try:
            reports.append(net.load_pretrained(path))
        except FileNotFoundError:
            raise UserError(f"--pretrained {path}: no such file (nothing is downloaded)") from None
        except ValueError as err:  # its message starts with the path
            raise UserError(f"--pretrained {err}") from None
    return reports


def check_output_folder(out: str) -> None:
    """The output folder exists (or is created) and takes a file, before any training step."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UserError(f"--out {out}: cannot write there ({err.strerror or err})") from None


# What a run writes into its folder; the first seven are there once it has trained an epoch or
# tested (a run, finished or not); `busseg eval` writes eval/ beside its checkpoint.
RUN_FILES = (
    "last.pt",
    "best.pt",
    "metrics.csv",
    "test_metrics.json",
    "test_per_image.csv",
    "curves.png",
    "overlays",
    "eval",
    "data.json",
    "log.txt",
    "tb",
)
RUN_MARKERS = RUN_FILES[:7]


def run_files(out: str) -> list[str]:
    """The marks of a run (finished or not) in folder `out`."""
    return [f for f in RUN_MARKERS if os.path.lexists(os.path.join(out, f))]


def claim_output_folder(out: str, overwrite: bool = False) -> None:
    """Before a fresh run: `out` must not hold a run, finished or not (its checkpoints, metrics and
    pictures would be replaced or mixed with the new run's), unless `overwrite`, which deletes the
    old run's files first (nothing else in the folder). What an aborted start left (data.json,
    log.txt) is replaced."""
    found = run_files(out)
    if found and not overwrite:
        raise UserError(
            f"--out {out}: holds a run ({', '.join(found)}); continue it with --resume "
            f"{os.path.join(out, 'last.pt')}, choose another --out, or pass --overwrite to delete it first"
        )
    if not os.path.isdir(out):
        return
    for name in RUN_FILES + tuple(f for f in os.listdir(out) if f.startswith(".tmp-")):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def prepare_output(cfg: TrainConfig, resume_path: str | None = None, overwrite: bool = False) -> None:
    """The output folder of a run that is about to start: a fresh run claims it
    (claim_output_folder); a resumed run continues in its checkpoint's folder, or claims another."""
    if resume_path is not None and os.path.realpath(os.path.dirname(os.path.abspath(resume_path))) == (
        os.path.realpath(cfg.out)
    ):
        return
    claim_output_folder(cfg.out, overwrite)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_items(splits, n: int, seed: int) -> list:
    """The fixed seeded set of unlabelled training images (with hidden masks) on which the pseudo-label
    check grades the teacher."""
    pool = [it for it in splits.unlabeled if it.masks or it.seed is not None]
    return random.Random(seed).sample(pool, min(n, len(pool)))


class TrainingDiverged(UserError):
    """The loss became infinite or NaN (too high a learning rate, most often)."""


class Trainer:
    """`pretrained=False` skips loading --pretrained (a resumed run overwrites those weights anyway,
    and the file need not exist any more). `overwrite`: a fresh run may replace a run in cfg.out
    (claim_output_folder)."""

    def __init__(self, cfg: TrainConfig, pretrained: bool = True, overwrite: bool = False):
        cfg.validate()
        self.overwrite = overwrite
        self._lines: list[str] = []  # printed before the log file is opened (fit)
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: this machine has no CUDA device (use --device cpu)")
        self.cfg = cfg
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        self.rank, self.world = _dist()
        self.device = torch.device(
            cfg.device if not cfg.device.startswith("cuda") else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        )
        torch.manual_seed(cfg.seed)
        self.splits = data.splits_for(cfg)
        self._say(self.splits.banner())
        if self.rank == 0:
            check_output_folder(cfg.out)
        data.check_items(self.splits, progress=not cfg.quiet and self.rank == 0)
        self.method = methods.build(cfg)
        student = build_model(cfg)
        self.method.check_network(cfg, student)
        if cfg.pretrained and pretrained:
            for report in load_pretrained(student, cfg.pretrained):
                self._say(f"pretrained {report}")
        student = student.to(self.device, memory_format=torch.channels_last if cfg.channels_last else None)
        self.teacher = copy.deepcopy(student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if self.world > 1 and self.device.type == "cuda":  # torch's SyncBatchNorm is CUDA-only; on CPU DDP
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)  # broadcasts rank 0's BN buffers
        if cfg.compile:  # in place: the state dicts keep their keys
            student.compile()
            self.teacher.compile()
        self.student = student  # under DDP, wrapped at the start of each epoch (_train_parts)
        self._frozen = None
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        # float16 gradients underflow without loss scaling (bfloat16 has float32's range)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        params = list(self.student.parameters()) + self.method.parameters()
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
            self.opt = kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        aug = dict(
            train=True,
            synthetic_size=cfg.synthetic_size,
            scale=(cfg.scale_min, cfg.scale_max),
            flip=cfg.flip,
            fov=cfg.fov,
        )
        self.lab_ds = data.SegDataset(self.splits.labeled, cfg.crop, seed=cfg.seed, **aug)
        self.unl_ds = data.SegDataset(self.splits.unlabeled, cfg.crop, seed=cfg.seed + 1, labeled=False, **aug)
        self.steps_per_epoch = self._steps_per_epoch()
        total = max(1, cfg.epochs * self.steps_per_epoch)
        decay = {
            "poly": lambda it: max(0.0, 1 - it / total) ** cfg.poly_power,
            "cosine": lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total) / total)),
            "constant": lambda it: 1.0,
        }[cfg.lr_schedule]
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, decay)
        self.epoch, self.step_in_epoch, self.global_step, self.best = 0, 0, 0, -1.0
        self.epoch_sums: dict[str, float] = {}  # the current epoch's loss sums over its steps so far
        self.tb = None

    # ------------------------------------------------------------------ data streams
    def _loader(self, ds, batch, epoch, cycle):
        sampler = torch.utils.data.DistributedSampler(
            ds, num_replicas=self.world, rank=self.rank, shuffle=True, seed=self.cfg.seed
        )
        sampler.set_epoch(epoch * 1000 + cycle)
        ds.set_epoch(epoch * 1000 + cycle)
        per_rank = math.ceil(len(ds) / self.world)
        return torch.utils.data.DataLoader(
            ds,
            batch_size=batch,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            drop_last=per_rank >= batch,
            generator=torch.Generator().manual_seed(self.cfg.seed + epoch),
            persistent_workers=False,
        )

    def _steps_per_epoch(self) -> int:
        """One pass over the larger of the two streams (normally the unlabelled set; the labelled set
        is cycled) — the same for every method, so suponly and a semi-supervised method on one
        partition take the same number of steps."""
        n = 1
        for ds, b in ((self.lab_ds, self.cfg.batch_labeled), (self.unl_ds, self.cfg.batch_unlabeled)):
            per_rank = math.ceil(len(ds) / self.world)
            n = max(n, per_rank // b)
        return min(n, self.cfg.max_steps) if self.cfg.max_steps else n

    def _batches(self, epoch):
        """Yields (labelled, unlabelled or None) batches for one epoch, cycling the shorter stream."""
        streams = {}

        def nxt(name, ds, batch):
            it, cycle = streams.get(name, (None, -1))
            while True:
                if it is not None:
                    try:
                        return next(it)
                    except StopIteration:
                        pass
                cycle += 1
                loader = self._loader(ds, batch, epoch, cycle)
                if len(loader) == 0:  # cycling it again would loop for ever
                    raise UserError(f"the {name} stream of rank {self.rank} has no batch ({len(ds)} images)")
                it = iter(loader)
                streams[name] = (it, cycle)

        semi = self.method.uses_unlabeled and len(self.unl_ds) > 0
        for _ in range(self.steps_per_epoch):
            lab = nxt("labelled", self.lab_ds, self.cfg.batch_labeled)
            unl = nxt("unlabelled", self.unl_ds, self.cfg.batch_unlabeled) if semi else None
            yield lab, unl

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def _ema_update(self):
        """Upstream's mean teacher: during the supervised-only epochs the teacher is the student
        (U2PL evaluates the student there and copies it into the teacher when they end); from the
        first semi-supervised step t = 0 the decay ramps as min(ema, 1 − 1/(t+1)). The BatchNorm
        statistics are averaged too, unless the method runs the teacher in train mode (U2PL's
        teacher_train_mode), which keeps its own."""
        if self.epoch < self.cfg.warmup_epochs:
            a = 0.0
        else:
            t = self.global_step - 1 - self.cfg.warmup_epochs * self.steps_per_epoch
            a = min(self.cfg.ema, 1 - 1 / (t + 1))
        s = self.student.module if hasattr(self.student, "module") else self.student
        for tp, sp in zip(self.teacher.parameters(), s.parameters()):
            tp.mul_(a).add_(sp.detach(), alpha=1 - a)
        if a > 0 and self.method.owns_teacher_bn:  # U2PL: the teacher's own train-mode BN statistics
            return
        for tb, sb in zip(self.teacher.buffers(), s.buffers()):
            if tb.dtype.is_floating_point:  # BN statistics follow the averaged weights they belong to
                tb.mul_(a).add_(sb, alpha=1 - a)
            else:
                tb.copy_(sb)

    def train_step(self, lab, unl, ctx) -> dict:
        def to(b):
            return None if b is None else {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in b.items()}

        self.student.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss, logs = self.method(self.student, self.teacher, to(lab), to(unl), ctx)
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k} {float(v):.4g}" for k, v in logs.items())
            last = os.path.join(self.cfg.out, "last.pt")
            raise TrainingDiverged(
                f"training diverged: the loss is {float(loss.detach())} at epoch {self.epoch + 1} step "
                f"{self.step_in_epoch + 1} ({terms}); lower --lr (now {self.cfg.lr:g}) or the loss weights"
                + (f"; {last} holds the last completed epoch" if self.epoch and os.path.isfile(last) else "")
            )
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # disabled (off, bf16): loss.backward() and opt.step()
        self._average_method_gradients()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.global_step += 1
        self._ema_update()
        logs = {k: float(v) for k, v in logs.items()}
        logs["loss"] = float(loss.detach())
        return logs

    def _average_method_gradients(self) -> None:
        """DDP averages the network's gradients; the method's own parameters (SemiSeg-CAW's learned loss
        weights) live outside it: average theirs across the processes too, or each would learn its own
        weights and only rank 0's be saved. A parameter gets a gradient where any process gave it one."""
        params = self.method.parameters()
        if self.world == 1 or not params:
            return
        # one all-reduce: the gradients (zeros where this process has none), then how many processes had one
        had = [p.grad is not None for p in params]
        grads = [
            p.grad.reshape(-1) if h else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            for p, h in zip(params, had)
        ]
        flat = torch.cat(grads + [torch.tensor(had, dtype=grads[0].dtype, device=grads[0].device)])
        dist.all_reduce(flat)
        sums = flat[: -len(params)].div_(self.world).split([p.numel() for p in params])
        for p, grad, count in zip(params, sums, flat[-len(params) :].tolist()):
            if count > 0:
                p.grad = grad.view_as(p).clone()

    def fit(self, until: int | None = None, test: bool = True) -> dict:
        """Train to epoch `until` (default: the last), then, when the schedule is complete and
        `test` holds, test the best checkpoint and write the outputs. Returns the test summary,
        {"stopped": True} after a signal, or {"epoch": n} when it ends without testing."""
        cfg = self.cfg
        until = cfg.epochs if until is None else min(until, cfg.epochs)
        if self.rank == 0:
            if self.global_step == 0 and self.epoch == 0 and self.step_in_epoch == 0:
                claim_output_folder(cfg.out, self.overwrite)  # a fresh run: no other run's files here
            os.makedirs(cfg.out, exist_ok=True)
            with open(os.path.join(cfg.out, "data.json"), "w") as f:
                json.dump(self.splits.describe(), f, indent=1)
            self._open_log()
            self._open_tb()
        stopped = False
        with checkpoint.StopGuard() as guard:
            while self.epoch < until and not stopped:
                stopped = self._run_epoch(guard)
        if stopped:
            self._say(f"stopped by signal; checkpoint {os.path.join(cfg.out, 'last.pt')}")
            return {"stopped": True}
        if self.epoch < cfg.epochs or not test:
            return {"epoch": self.epoch}
        return self.finish()

    def _train_parts(self, ctx) -> None:
        """Freeze for this epoch the parts of the network its steps give no gradient (the method
        says which: a head during the supervised-only epochs, the network of the other stage), and
        under DDP wrap the student anew when they change: DDP syncs exactly the parameters that
        train, with no search for unused ones."""
        net = self.student.module if hasattr(self.student, "module") else self.student
        frozen = {id(p) for part in self.method.frozen(net, ctx) for p in part.parameters()}
        if frozen == self._frozen:
            return
        for p in net.parameters():
            p.requires_grad_(id(p) not in frozen)
        self._frozen = frozen
        if self.world > 1:
            self.student = torch.nn.parallel.DistributedDataParallel(net)

    def _run_epoch(self, guard) -> bool:
        cfg = self.cfg
        ctx = {
            "epoch": self.epoch,
            "warmup": self.epoch < cfg.warmup_epochs,
            "semi": self.method.uses_unlabeled and len(self.unl_ds) > 0,  # unlabelled batches come
            "progress": self.epoch / max(1, cfg.epochs),
            "epochs": cfg.epochs,
        }
        self._train_parts(ctx)
        if self.step_in_epoch > self.steps_per_epoch:  # equal: stopped after the last step, before the epoch's end
            raise UserError(
                f"--resume: the checkpoint stopped after step {self.step_in_epoch} of epoch {self.epoch + 1}, but this "
                f"config has {self.steps_per_epoch} steps per epoch (--max-steps, the batch sizes or the data changed)"
            )
        sums = self.epoch_sums  # a resumed epoch continues the sums of its first steps
        batches = self._batches(self.epoch)
        resume_rng = getattr(self, "_resume_rng", None)
        for _ in range(self.step_in_epoch):  # mid-epoch resume: replay the data stream
            next(batches)
        if resume_rng is not None:
            checkpoint.set_rng_state(resume_rng)
            self._resume_rng = None
        bar = self._bar(self.steps_per_epoch - self.step_in_epoch)
        for lab, unl in batches:
            logs = self.train_step(lab, unl, ctx)
            self.step_in_epoch += 1
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items()})
            if self._stop_requested(guard):
                if bar is not None:
                    bar.close()
                self._save("last.pt")
                return True
        if bar is not None:
            bar.close()
        row = {"epoch": self.epoch + 1, "step": self.global_step, "lr": self.sched.get_last_lr()[0]}
        row.update({k: v / self.step_in_epoch for k, v in sums.items()})  # the mean over all its steps
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums = {}
        if self.rank == 0:
            row.update(self._pseudo_label_check(ctx))
            val = self.evaluate(self.splits.val) if self.splits.val else None
            if val is not None:
                row["val_dice"] = val["summary"]["dice"][0]
                if row["val_dice"] >= self.best:  # ties: the later (more trained) teacher
                    self.best = row["val_dice"]
                    self._save("best.pt")
            self._log(row)
        self._save("last.pt")
        return False

    def _stop_requested(self, guard) -> bool:
        flag = torch.tensor([1.0 if guard.requested else 0.0])
        if self.world > 1:  # every rank stops at the same step
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ evaluation and outputs
    @torch.no_grad()
    def evaluate(self, items, model=None, overlay_dir=None, progress=False) -> dict:
        return evaluate(
            model or self.teacher,
            items,
            device=self.device,
            fov=self.cfg.fov,
            synthetic_size=self.cfg.synthetic_size,
            overlay_dir=overlay_dir,
            overlays=self.cfg.overlays,
            progress=progress and not self.cfg.quiet,
        )

    def _pseudo_label_check(self, ctx) -> dict:
        """Diagnosis only: the teacher's pseudo-labels on a fixed seeded set of unlabelled images,
        graded with their hidden masks (never used for training), and the method's filter."""
        n = self.cfg.pseudo_label_check
        if not n or not self.splits.unlabeled:
            return {}
        if not hasattr(self, "_check_items"):
            self._check_items = check_items(self.splits, n, self.cfg.seed)
        if not self._check_items:
            return {}
        return pseudo_label_quality(  # the filter as the epoch just trained applied it
            self.teacher,
            self._check_items,
            lambda prob, cls: self.method.pseudo_label_keep(prob, cls, ctx),
            device=self.device,
            fov=self.cfg.fov,
            synthetic_size=self.cfg.synthetic_size,
        )

    def finish(self) -> dict:
        cfg = self.cfg
        result = {}
        if self.rank == 0:
            best = os.path.join(cfg.out, "best.pt")
            model = self.teacher
            if os.path.isfile(best):
                model = build_model(cfg).to(self.device)
                model.load_state_dict(checkpoint.load(best)["teacher"])
            res = self.evaluate(
                self.splits.test, model=model, overlay_dir=os.path.join(cfg.out, "overlays"), progress=True
            )
            write_results(res, cfg.out, method=cfg.method)
            warning = background_warning(res, cfg)
            if warning:
                self._say(warning)
            if os.path.isfile(os.path.join(cfg.out, "metrics.csv")):
                visualize.plot_curves(os.path.join(cfg.out, "metrics.csv"), os.path.join(cfg.out, "curves.png"))
            result = res["summary"]
            if self.tb is not None:
                self.tb.close()
        if self.world > 1:
            dist.barrier()
        return result

    def state_dict(self) -> dict:
        s = self.student.module if hasattr(self.student, "module") else self.student
        return {
            "config": dataclasses.asdict(self.cfg),
            "student": s.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "method": self.method.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best": self.best,
            "rng": checkpoint.rng_state(),
            "scaler": self.scaler.state_dict(),  # {} unless --amp fp16
            "epoch_sums": dict(self.epoch_sums),
        }

    def load_state_dict(self, st: dict) -> None:
        checkpoint.check_progress(st)
        s = self.student.module if hasattr(self.student, "module") else self.student
        s.load_state_dict(st["student"])
        self.teacher.load_state_dict(st["teacher"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.method.load_state_dict(st["method"])
        self.epoch, self.step_in_epoch = st["epoch"], st["step_in_epoch"]
        self.global_step, self.best = st["global_step"], st["best"]
        # written since the epoch mean counts the steps before an interruption; older checkpoints: none
        self.epoch_sums = dict(st.get("epoch_sums", {}))
        if st.get("scaler"):  # saved by an fp16 run
            self.scaler.load_state_dict(st["scaler"])
        if self.step_in_epoch:
            self._resume_rng = st["rng"]  # restored after the data stream is replayed
        else:
            checkpoint.set_rng_state(st["rng"])

    def warm_start(self, st: dict, source: str = "warm start") -> None:
        """Continue from another method's checkpoint of the same network, e.g. a shared
        supervised-only warm-up (benchmarks/diagnose.py): the heads this method has and it lacks
        keep their initialisation (a seed draws them alike) and start without optimizer state."""
        s = self.student.module if hasattr(self.student, "module") else self.student
        own = s.state_dict()
        added = set(own) - set(st["student"])
        if not all(k.startswith(checkpoint.V1_HEADS) for k in added) or set(st["student"]) - set(own):
            raise UserError(f"{source}: the checkpoint's network is not this method's without its heads")
        names_from = checkpoint.parameter_names(st["student"])
        self.load_state_dict(
            {
                **st,
                "student": {**own, **st["student"]},
                "teacher": {**self.teacher.state_dict(), **st["teacher"]},
                "optimizer": checkpoint.renumber_optimizer(
                    st["optimizer"], names_from, [n for n, _ in s.named_parameters()], source
                ),
            }
        )

    def resume(self, source) -> None:
        """Continue from a checkpoint (a path, or what checkpoint.load returned)."""
        st = checkpoint.load(source) if isinstance(source, str) else source
        checkpoint.require(st, checkpoint.TRAINING_KEYS, source if isinstance(source, str) else "--resume")
        try:
            self.load_state_dict(st)
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(
                f"--resume: the checkpoint does not fit the network and optimizer of this config "
                f"({' '.join(str(err).split())[:200]})"
            ) from None

    def _save(self, name: str) -> None:
        if self.rank == 0:
            checkpoint.save(self.state_dict(), os.path.join(self.cfg.out, name))

    def _log(self, row: dict) -> None:
        """Append a row to metrics.csv, rewriting it when new columns appear (loss_u after warm-up)."""
        path = os.path.join(self.cfg.out, "metrics.csv")
        rows = []
        if os.path.isfile(path):
            with open(path) as f:
                rows = list(csv.DictReader(f))
        rows.append(row)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, keys, restval="")
            w.writeheader()
            w.writerows(rows)
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("epoch",):
                    self.tb.add_scalar(k, v, row["epoch"])
        self._say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def _say(self, line: str) -> None:
        """Print a line of the run (rank 0, --quiet too) and keep it in log.txt."""
        if self.rank != 0:
            return
        print(line, flush=True)
        if getattr(self, "_log_file", None) is not None:
            with open(self._log_file, "a") as f:
                f.write(line + "\n")
        else:
            self._lines.append(line)

    def _open_log(self) -> None:
        """log.txt in the output folder: what the run printed before it (the data banner) and since."""
        self._log_file = os.path.join(self.cfg.out, "log.txt")
        with open(self._log_file, "a") as f:
            f.writelines(line + "\n" for line in self._lines)
        self._lines = []

    def _open_tb(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: CSV only
            return
        self.tb = SummaryWriter(os.path.join(self.cfg.out, "tb"))

    def _bar(self, total):
        if self.cfg.quiet or self.rank != 0:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        # disable=None: only on a terminal (a log file would get every refresh)
        return tqdm(total=total, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", leave=False, disable=None)


def background_warning(res: dict, cfg: TrainConfig | None = None) -> str | None:
    """A warning line when the model predicts no lesion pixel on any image while some have a lesion
    (Dice 0 everywhere), with the likely causes; None otherwise. `res`: what evaluate returns."""
    n, lesions = len(res["per_image"]), res.get("lesion_images", 0)
    if not n or res.get("empty_predictions", 0) < n or not lesions:
        return None
    causes = []
    if cfg is not None and cfg.criterion in ("ce", "ohem"):
        causes.append(
            f"cross-entropy (--criterion {cfg.criterion}) is first lowered by predicting background, the lesions "
            "being a small share of the pixels"
        )
    if cfg is not None and cfg.ema >= 0.95:
        causes.append(
            f"the evaluated teacher averages the student over ~{round(1 / (1 - cfg.ema))} steps (--ema {cfg.ema})"
        )
    return (
        f"warning: no lesion pixel predicted on any of the {n} images ({lesions} have a lesion), so Dice is 0: the "
        "model is still on the all-background solution, as after a short run"
        + (f" ({'; '.join(causes)})" if causes else "")
        + "; train longer, or for a short run use --ema 0.9 --criterion ce+dice"
    )


def run(cfg: TrainConfig, resume=None, overwrite: bool = False, resume_path: str | None = None) -> dict:
    """Train (continuing from `resume`: a checkpoint path or a loaded checkpoint, read from
    `resume_path`) and evaluate. A fresh run refuses an output folder that holds another run unless
    `overwrite` (prepare_output)."""
    t0 = time.time()
    if isinstance(resume, str):
        resume_path = resume
    prepare_output(cfg, resume_path if resume is not None else None, overwrite)
    tr = Trainer(cfg, pretrained=resume is None, overwrite=overwrite)
    if resume:
        tr.resume(resume)
    res = tr.fit()
    res["wall_s"] = time.time() - t0
    return res
