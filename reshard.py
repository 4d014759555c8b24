"""Checkpoint files that resume on any layout: another number of ranks, the other sharding, another shard unit.

Every tensor is named by its Meta name and cut by rows (dim 0), whatever the layout; only where the cuts fall
changes. So each rank's file, rankR.pt, holds its rows of each tensor with their global offsets, and its base
optimizer's state by the same names:

    format       FORMAT
    shapes       {name: the full tensor's shape}
    rows         {name: (start, stop)}: the rows of the full tensor held here (a tied embedding is one tensor)
    model        {name: those rows}
    state        {name: {key: tensor}}: the optimizer's state of that tensor (see below)
    optimizer    what the optimizer holds for all tensors at once: hyper-parameters, LOMO's step counter and fp16
                 loss scale (None for --optimizer lora, which trains no weight of the model)
    scheduler, step, position, rng, python_rng, cuda_rng

A rank that loads reads, for each tensor, the rows it now owns from whichever files hold them. The files are
memory-mapped one at a time (torch.load(mmap=True)) and only the overlapping rows are copied into the rank's own
tensors: it allocates nothing beyond its own rows and their optimizer state (and one replicated vector at a time),
and the file pages it reads are those of its own rows, mapped (the OS can drop them) until the next file is opened.

The optimizer's state of a tensor reshards by its key:
    ROW_STATE   one value per row of the weight: AdaLomo's row statistics ("row") and a vector's second moment
                ("sq"); AdamW's moments; the fp32 master of a 16-bit weight ("master", --optimizer sgd / adamw)
    REPLICATED  the same whole tensor on every rank: AdaLomo's column statistics ("col", all-reduced each step)
    0-dim       global: AdamW's step count
LOMO keeps none. LoRA's adapters and their AdamW state are whole on every rank and saved once (rundir.py).
"""
import torch

import shard

FORMAT = 2  # 1: the files of train.py before resharding (index-keyed optimizer state, position in batches)
ROW_STATE = {"row", "sq", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "master"}
REPLICATED = {"col"}


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _compact(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it when it is a view into a larger storage (FSDP2's padded shards), which torch.save would
    otherwise write whole. A shard that owns its storage is saved without a copy: a save costs no extra memory."""
    t = _local(t).detach()
    return t if t.untyped_storage().nbytes() == t.nbytes and t.storage_offset() == 0 else t.clone()


def _kind(key: str, value) -> str:
    if key in ROW_STATE:
        return "rows"
    if key in REPLICATED or not torch.is_tensor(value) or value.dim() == 0:
        return "whole"
    raise ValueError(f"optimizer state {key!r}: reshard.py does not know how it is sharded; add it to ROW_STATE "
                     "or REPLICATED")


def _optimizer_params(opt) -> list:
    """(model parameter, the tensor the optimizer keeps its state under) for each parameter of `opt`: the parameter
    itself, or, for the master-weight baselines (optimizers._MasterWeights), its fp32 master."""
    keys = [p for group in opt.param_groups for p in group["params"]]
    return list(zip(getattr(opt, "model_params", keys), keys))


def rank_state(model, base) -> dict:
    """This rank's file (without the scheduler, step, position and RNG, which the caller adds): its rows and the
    base optimizer's state (None for --optimizer lora), all by name."""
    params = shard.named_params(model)
    name_of = {id(p): name for name, p in params.items()}
    state, rest = {}, None
    if base is not None:
        for p, key in _optimizer_params(base):
            saved = {k: _compact(v) if torch.is_tensor(v) else v for k, v in base.state.get(key, {}).items()}
            for k, v in saved.items():
                _kind(k, v)  # refuse now, not at a resume, a state that no load could reshard
            if key.dtype != p.dtype:  # the fp32 master of a 16-bit weight (an fp32 weight is its own master)
                saved["master"] = _compact(key)
            state[name_of[id(p)]] = saved
        rest = {k: v for k, v in base.state_dict().items() if k not in ("state", "masters")}
        rest["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in rest["param_groups"]]
    return {"format": FORMAT, "shapes": shard.full_shapes(model), "rows": shard.local_rows(model),
            "model": {name: _compact(p) for name, p in params.items()}, "state": state, "optimizer": rest}


def _open(path):
    """A rank file, memory-mapped: its tensors are read from disk only where they are sliced."""
    return torch.load(path, mmap=True, map_location="cpu", weights_only=True)


def read_rows(files: list, model) -> tuple[dict, list]:
    """Copy this rank's rows of every tensor into `model`, from the saved rank files `files` (in rank order), and
    gather this rank's part of the optimizer's state. Returns (the optimizer's state by name, each file's small
    part: optimizer, scheduler, step, position, RNG states). Raises ValueError for a checkpoint of another model
    or one that misses rows."""
    mine, tensors, shapes = shard.local_rows(model), shard.local_tensors(model), shard.full_shapes(model)
    state, done, heads = {}, {}, []  # done[(name, key)]: rows filled so far (key None: the weight itself)
    for path in files:
        try:
            saved = _open(path)
        except Exception as e:  # a missing, truncated or corrupt file
            raise ValueError(f"cannot read {path.name} ({e}); the checkpoint is corrupt") from e
        if saved.get("format") != FORMAT:
            raise ValueError(f"{path.name} is not a rank file of checkpoint format {FORMAT}")
        if saved["shapes"] != shapes:
            wrong = sorted(n for n in saved["shapes"].keys() | shapes.keys()
                           if saved["shapes"].get(n) != shapes.get(n))
            raise ValueError(f"it holds a different model than --model / --ckpt describe (first differences: "
                             f"{wrong[:5]}); pass the flags of the run that saved it")
        for name, (start, stop) in mine.items():
            lo, hi = saved["rows"][name]
            a, b = max(start, lo), min(stop, hi)  # the rows that this file holds and this rank needs
            pieces = {None: saved["model"][name], **saved["state"].get(name, {})}
            for key, piece in pieces.items():
                kind = "rows" if key is None else _kind(key, piece)
                slots = state.setdefault(name, {}) if key is not None else None  # made when first needed
                if kind == "whole":  # the same on every rank: take the first file's
                    if key not in slots:
                        slots[key] = piece.clone() if torch.is_tensor(piece) else piece
                    continue
                if key is None:
                    target = tensors[name]
                else:
                    if key not in slots:
                        slots[key] = piece.new_empty((stop - start,) + tuple(piece.shape[1:]))
                    target = slots[key]
                if a < b:
                    with torch.no_grad():
                        target[a - start:b - start].copy_(piece[a - lo:b - lo])
                    done[name, key] = done.get((name, key), 0) + b - a
        heads.append({k: v.clone() if torch.is_tensor(v) else v  # the RNG states: copied, so that the file is
                      for k, v in saved.items() if k not in ("model", "state")})  # unmapped once `saved` goes
        del saved
    for name, (start, stop) in mine.items():
        for key in [None] + [k for k, v in state.get(name, {}).items() if _kind(k, v) == "rows"]:
            if done.get((name, key), 0) != stop - start:
                raise ValueError(f"rows {start}:{stop} of {name}{'' if key is None else ' (' + key + ')'} are not "
                                 "all in the rank files: the checkpoint is incomplete")
    return state, heads


def _like(key: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`rows` laid out as `key`, the tensor a torch optimizer keeps its state under: an FSDP2 DTensor too."""
    out = torch.zeros_like(key, dtype=rows.dtype)
    _local(out).copy_(rows)
    return out


def optimizer_state_dict(base, model, saved: dict, state: dict) -> dict:
    """The base optimizer's state_dict() for this run's parameters, in this run's layout, from a rank file's global
    part `saved` (its "optimizer") and this rank's state by name (read_rows): what base.load_state_dict() takes."""
    name_of = {id(p): name for name, p in shard.named_params(model).items()}
    ours = base.state_dict()["param_groups"]
    ids = [i for group in ours for i in group["params"]]
    by_id, masters = {}, []
    for i, (p, key) in zip(ids, _optimizer_params(base)):
        values = dict(state.get(name_of[id(p)], {}))
        if key is not p:  # torch's optimizers keep their moments, and the masters, laid out as the master
            values = {k: _like(key, v) if _kind(k, v) == "rows" else v for k, v in values.items()}
        if key.dtype != p.dtype:
            masters.append(values.pop("master"))  # the masters of 16-bit weights, in model order
        by_id[i] = values
    groups = [{**group, "params": mine["params"]} for group, mine in zip(saved["param_groups"], ours)]
    return {**saved, "param_groups": groups, "state": by_id, "masters": masters}
