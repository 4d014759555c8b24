"""What the benchmarks (bench.py, bench_eval.py) share: how they measure, and the random models they measure.

Peak memory: on GPU torch.cuda.max_memory_allocated; on CPU, which has no allocator statistics, the live tensor
storage bytes that `TensorMemoryTracker` counts (the tests use it too). Time: wall time with the device's queued
work synchronised before and after.
"""
import contextlib
import os
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from model import ModelArgs, Transformer
from plan import GiB

# The CPU default: GPT-2-small-sized LLaMA, 134M parameters. fp32, because this project's CPU (AMD EPYC, no
# AVX512-BF16) runs bf16 matmuls 7 to 100 times slower than fp32 ones.
BENCH_MODELS = {"small": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, max_seq_len=2048),
                "mini": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)}


def model_args(name: str) -> ModelArgs:
    return ModelArgs(**BENCH_MODELS[name]) if name in BENCH_MODELS else ModelArgs.from_name(name)


def random_model(margs, dtype, device) -> Transformer:
    """Per-block activation checkpointing, as train.py; N(0, 0.02) weights and norms 1, as model.init_weights."""
    with torch.device("meta"):
        model = Transformer(margs, checkpointing=True)
    model.to(dtype).to_empty(device=device)  # straight in the benchmark's dtype: no fp32 copy on the device
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model


def random_batch(margs, batch, seq_len, device, seed=0):
    tokens = torch.randint(margs.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    return tokens.to(device)


# ------------------------------------------------------------------------------------------------ memory

class TensorMemoryTracker(TorchDispatchMode):
    """Live tensor bytes and their peak, counted by storage, for devices without an allocator's statistics.

    Every tensor that an op takes or returns is counted once per storage (views share it), from the moment it is
    first seen until its storage is freed (weakref.finalize on the UntypedStorage). Tensors made before entering
    the mode count when first used, so pass the ones that must count from the start (the model's parameters).
    Wrapper subclasses (FSDP2's DTensor) count their inner tensors; storage.resize_ (FSDP2 frees and refills its
    unsharded parameters so) is followed. Not seen: scratch memory inside one kernel, and buffers that C++ code
    allocates outside the dispatcher (gloo's). On CPU autograd runs backward on the calling thread, so the mode
    sees the backward ops too.
    """

    def __init__(self, tensors=()):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0  # live: storage id -> bytes
        self.track(list(tensors))

    def track(self, obj):
        for t in tree_leaves(obj):
            if isinstance(t, torch.Tensor):
                self._see(t)

    def _see(self, t):
        if is_traceable_wrapper_subclass(t):
            self.track([getattr(t, name) for name in t.__tensor_flatten__()[0]])
            return
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = 0
            weakref.finalize(storage, self._resize, key, None)
        self._resize(key, storage.nbytes())

    def _resize(self, key, nbytes):
        """Set storage `key` to `nbytes` (None: freed)."""
        old = self.live.pop(key, 0) if nbytes is None else self.live.get(key, 0)
        if nbytes is not None:
            self.live[key] = nbytes
        self.current += (nbytes or 0) - old
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.track((args, kwargs))
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out

    def __enter__(self):
        original, tracker = torch.UntypedStorage.resize_, self

        def resize_(storage, size):
            result = original(storage, size)
            if storage._cdata in tracker.live:
                tracker._resize(storage._cdata, storage.nbytes())
            return result
        torch.UntypedStorage.resize_, self._original_resize = resize_, original
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)


@contextlib.contextmanager
def peak_memory(device, tensors=()):
    """Yields a dict whose 'gib' is set on exit: the peak tensor memory inside the block."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["gib"] = torch.cuda.max_memory_allocated(device) / GiB
    else:
        with TensorMemoryTracker(tensors) as tracker:
            yield result
        result["gib"] = tracker.peak / GiB


def memory_how(device) -> str:
    """How peak_memory measures on `device`, for the reports."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "live tensor storage counted by measure.TensorMemoryTracker"


# -------------------------------------------------------------------------------------------------- time

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds that fn() takes, its queued device work included: the device is synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
