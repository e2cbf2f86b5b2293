"""safetensors files of a Hugging Face checkpoint directory: find, peek, stream, and write in shards.

Reading never materialises more than one tensor: headers give names and shapes, `safe_open` memory-maps
the file and `get_tensor` copies out one tensor at a time (`iter_readers`: parts of one).  Writing holds
one shard's tensors at a time.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB' or '500MiB' (transformers' max_shard_size convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: a number of bytes or e.g. '5GB', '500MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def weight_files(path: str) -> dict[str, str]:
    """tensor name -> file, from the index when there is one, else from every *.safetensors in `path`."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no {INDEX} and no *.safetensors files in {path!r}")
    out: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in f.keys():
                if k in out:
                    raise ValueError(f"tensor {k!r} is in both {out[k]!r} and {file!r}")
                out[k] = file
    return out


def _by_file(files: dict[str, str], keys: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(files[k], []).append(k)
    return dict(sorted(out.items()))


def tensor_shapes(files: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype string), read from the headers only."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for file, keys in _by_file(files, files).items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in keys:
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
    return out


def iter_tensors(files: dict[str, str], keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for `keys`, one at a time, file by file (each file opened once)."""
    for file, names in _by_file(files, keys).items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in names:
                yield k, f.get_tensor(k)


def iter_readers(
    files: dict[str, str], keys: Iterable[str]
) -> Iterator[tuple[str, Callable[[tuple[slice, ...]], torch.Tensor]]]:
    """(name, read) for `keys`, file by file: `read(box)` copies out only that box (a slice per dim) of the
    tensor, which safetensors reads from the memory-mapped file without touching the rest."""
    for file, names in _by_file(files, keys).items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in names:
                yield k, f.get_slice(k).__getitem__


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy split of (name, nbytes), in order, into shards of at most max_shard_size bytes.

    A tensor bigger than max_shard_size gets a shard of its own (transformers does the same)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def remove_old_weights(path: str) -> None:
    """Delete weight files a previous export left in `path` (other file names are never touched)."""
    for name in os.listdir(path):
        if name in (SINGLE, INDEX) or _SHARD_RE.match(name):
            os.remove(os.path.join(path, name))


def write_shards(
    path: str,
    names: list[str],
    nbytes: Callable[[str], int],
    tensor: Callable[[str], torch.Tensor],
    max_shard_size: int,
) -> list[str]:
    """Write `names` (materialised one shard at a time by `tensor(name)`) as model.safetensors, or as
    model-XXXXX-of-YYYYY.safetensors plus model.safetensors.index.json when more than one shard is needed."""
    os.makedirs(path, exist_ok=True)
    remove_old_weights(path)
    shards = plan_shards([(n, nbytes(n)) for n in names], max_shard_size)
    files = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    for file, shard in zip(files, shards, strict=True):
        # clone: safetensors refuses tensors that share storage (expert slices of one fused parameter do)
        tensors = {n: tensor(n).detach().to("cpu", copy=True).contiguous() for n in shard}
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: file for n in shard})
    if len(shards) > 1:
        total = sum(nbytes(n) for n in names)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(path, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    return files
