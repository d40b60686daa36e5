"""ClassMemoryBank: the per-class FIFO memory bank of PH-Net (Eq. 14), a ring buffer per class on
the device.

    bank = ClassMemoryBank(num_classes, dim, capacity, device)
    bank.push(features, labels)   # detached; all-gathered across ranks under torch.distributed
    bank.mean(c)                  # z_c⁺, None for an empty class
    bank.means()                  # [z_0⁺, …] for memory_contrastive_loss

When a class's buffer is full, the oldest rows are overwritten first (some public implementations
drop the newest instead). The state (rows, fill counts, write pointers) goes into checkpoints via
state_dict / load_state_dict.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _validate


class ClassMemoryBank:
    def __init__(self, num_classes: int, dim: int, capacity: int, device=None, dtype: torch.dtype = torch.float32):
        _validate.integer("num_classes", num_classes, minimum=1)
        _validate.integer("dim", dim, minimum=1)
        _validate.integer("capacity", capacity, minimum=1)
        if dtype not in _validate.FLOATING_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in _validate.FLOATING_DTYPES)
            raise TypeError(f"dtype must be one of {names} (the bank stores features), got {dtype}")
        self.num_classes, self.dim, self.capacity = num_classes, dim, capacity
        device = torch.device("cpu" if device is None else device)
        self.features = torch.zeros(num_classes, capacity, dim, dtype=dtype, device=device)
        self.count = torch.zeros(num_classes, dtype=torch.int64, device=device)  # rows held
        self.head = torch.zeros(num_classes, dtype=torch.int64, device=device)  # next write slot

    @property
    def device(self) -> torch.device:
        return self.features.device

    # ---- writing ---------------------------------------------------------------------------
    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Append ``features`` (n, dim) with class ``labels`` (n,) in row order (labels outside
        [0, num_classes) are dropped). Under an initialised torch.distributed process group the
        pushes of all ranks are gathered first (rank order), so every rank holds the same bank.
        ``labels`` must be an integer tensor (a float one would be truncated) and the features
        finite in the bank's dtype (a NaN or inf row would poison its class mean for
        ``capacity`` pushes)."""
        _validate.tensor("features", features, 2, "(n, dim)", allow_empty=True)
        _validate.tensor("labels", labels, 1, "(n,)", floating=False, allow_empty=True)
        _validate.integer_tensor("labels", labels)
        if features.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got {tuple(features.shape)}")
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must be (n,) with n = {features.shape[0]}, got {tuple(labels.shape)}")
        features = features.detach().to(self.device, self.features.dtype)
        if not bool(features.isfinite().all()):
            raise ValueError(f"features must be finite in the bank's dtype {self.features.dtype} (found NaN or inf)")
        labels = labels.detach().to(self.device, torch.int64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            features, labels = _all_gather_rows(features, labels)
        for c in range(self.num_classes):
            self._push_class(c, features[labels == c])

    def _push_class(self, c: int, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        rows = rows[-self.capacity :]  # of a push larger than the buffer, the newest rows survive
        skipped = n - rows.shape[0]
        start = self.head[c] + skipped
        slots = (start + torch.arange(rows.shape[0], device=self.device)) % self.capacity
        self.features[c].index_copy_(0, slots, rows)
        self.head[c] = (self.head[c] + n) % self.capacity
        self.count[c] = torch.clamp(self.count[c] + n, max=self.capacity)

    def reset(self) -> None:
        self.features.zero_()
        self.count.zero_()
        self.head.zero_()

    # ---- reading ---------------------------------------------------------------------------
    def entries(self, c: int) -> torch.Tensor:
        """The rows of class ``c`` from oldest to newest, (count, dim)."""
        self._check_class(c)
        n = int(self.count[c])
        if n < self.capacity:
            return self.features[c, :n]
        return self.features[c].roll(-int(self.head[c]), 0)

    def mean(self, c: int) -> torch.Tensor | None:
        """z_c⁺ (Eq. 14): the mean of class ``c``'s rows; None when the class is empty."""
        self._check_class(c)
        n = int(self.count[c])
        return None if n == 0 else self.features[c, :n].mean(0)

    def means(self) -> list[torch.Tensor | None]:
        return [self.mean(c) for c in range(self.num_classes)]

    def __len__(self) -> int:
        return int(self.count.sum())

    def _check_class(self, c: int) -> None:
        _validate.integer("c", c, minimum=0)
        if c >= self.num_classes:
            raise ValueError(f"c must be < num_classes = {self.num_classes}, got {c}")

    # ---- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"features": self.features.clone(), "count": self.count.clone(), "head": self.head.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restores rows, fill counts and write pointers; checks them all before changing
        anything: shapes, finite floating features, integer counts in [0, capacity] and pointers
        in [0, capacity), the pointer of a class below capacity at its count."""
        for key, mine in (("features", self.features), ("count", self.count), ("head", self.head)):
            if key not in state:
                raise KeyError(f"state_dict is missing {key!r}")
            if not isinstance(state[key], torch.Tensor):
                raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(state[key]).__name__}")
            if tuple(state[key].shape) != tuple(mine.shape):
                raise ValueError(
                    f"state_dict[{key!r}] has shape {tuple(state[key].shape)}, this bank needs {tuple(mine.shape)}"
                )
        if not state["features"].is_floating_point():
            raise TypeError(f"state_dict['features'] must be floating, got {state['features'].dtype}")
        if not bool(state["features"].to(self.features.dtype).isfinite().all()):
            raise ValueError(
                f"state_dict['features'] must be finite in the bank's dtype {self.features.dtype} (found NaN or inf)"
            )
        for key, stop in (("count", self.capacity + 1), ("head", self.capacity)):
            if state[key].is_floating_point() or state[key].is_complex() or state[key].dtype == torch.bool:
                raise TypeError(f"state_dict[{key!r}] must be an integer tensor, got {state[key].dtype}")
            if bool(((state[key] < 0) | (state[key] >= stop)).any()):
                raise ValueError(f"state_dict[{key!r}] must hold values in [0, {stop}), got {state[key].tolist()}")
        # a class that has not filled up yet writes right after its rows
        partial = state["count"] < self.capacity
        if bool((partial & (state["head"] != state["count"])).any()):
            raise ValueError(
                f"state_dict['head'] must equal state_dict['count'] for classes below capacity, got "
                f"head {state['head'].tolist()} and count {state['count'].tolist()}"
            )
        for key, mine in (("features", self.features), ("count", self.count), ("head", self.head)):
            mine.copy_(state[key])


def _all_gather_rows(features: torch.Tensor, labels: torch.Tensor):
    """Rows of every rank, concatenated in rank order, with tensor collectives only: gather the
    row counts, pad to the largest, gather, trim."""
    world = dist.get_world_size()
    # gloo gathers CPU tensors, NCCL device tensors: use the bank's device unless it is gloo.
    comm = torch.device("cpu") if dist.get_backend() == "gloo" else features.device
    n = torch.tensor([features.shape[0]], dtype=torch.int64, device=comm)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    biggest = max(sizes)
    padded_f = features.new_zeros(biggest, features.shape[1]).to(comm)
    padded_f[: features.shape[0]] = features.to(comm)
    padded_l = torch.full((biggest,), -1, dtype=torch.int64, device=comm)
    padded_l[: labels.shape[0]] = labels.to(comm)
    all_f = [torch.empty_like(padded_f) for _ in range(world)]
    all_l = [torch.empty_like(padded_l) for _ in range(world)]
    dist.all_gather(all_f, padded_f)
    dist.all_gather(all_l, padded_l)
    f = torch.cat([t[:s] for t, s in zip(all_f, sizes)]).to(features.device)
    l = torch.cat([t[:s] for t, s in zip(all_l, sizes)]).to(labels.device)
    return f, l
