"""Read parts of a safetensors checkpoint without reading the rest.

A sharded engine needs, on each rank, only its share of every weight: FSDP2 shards dim 0
(rank r holds rows [r x ceil(R/N), ...)), DeepSpeed ZeRO-3 a contiguous range of the
flattened tensor. safetensors files are memory-mapped and ``get_slice`` copies only the
rows asked for, so a rank touches about 1/N of the file (plus one row at each end of a
flat range) and host memory at load is bounded by one copy of the model per node, not one
per process. Files are opened one at a time and closed after use, so mapped pages do not
accumulate in the process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

CHUNK_BYTES = 16 * 1024**2


class Checkpoint:
    """The tensors of a Hugging Face model folder (model.safetensors or an index of shards)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors weights")
            from safetensors import safe_open

            weight_map = {}
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    weight_map.update(dict.fromkeys(f.keys(), file.name))
        self.files = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.files

    @contextmanager
    def _open(self, name: str) -> Iterator[Any]:
        from safetensors import safe_open

        with safe_open(str(self.folder / self.files[name]), framework="pt") as f:
            yield f

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 (all of a 0-d tensor)."""
        with self._open(name) as f:
            part = f.get_slice(name)
            if not part.get_shape():
                return f.get_tensor(name)
            return part[start:stop]

    def copy_rows(self, name: str, start: int, stop: int, into: torch.Tensor) -> None:
        """Rows [start, stop) into ``into``, CHUNK_BYTES at a time, so that what is read in flight
        (the slice and its mapped file pages) stays small next to a rank's share."""
        self._chunked(name, start, stop, into.reshape(stop - start, -1) if into.dim() else into.reshape(1), self.rows)

    def copy_flat(self, name: str, start: int, stop: int, into: torch.Tensor) -> None:
        """Elements [start, stop) of the flattened tensor into the 1-d ``into``, CHUNK_BYTES at a time."""
        self._chunked(name, start, stop, into, self.flat)

    def _chunked(self, name: str, start: int, stop: int, into: torch.Tensor,
                 read: Callable[[str, int, int], torch.Tensor]) -> None:  # fmt: skip
        per_unit = max(1, into[0].numel() * into.element_size()) if into.dim() > 1 else into.element_size()
        step = max(1, CHUNK_BYTES // per_unit)
        for first in range(start, stop, step):
            last = min(stop, first + step)
            into[first - start : last - start].copy_(
                read(name, first, last).reshape(into[first - start : last - start].shape)
            )

    def flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, reading only the rows they lie in."""
        with self._open(name) as f:
            part = f.get_slice(name)
            shape = part.get_shape()
            if len(shape) <= 1:
                return part[start:stop].reshape(-1) if shape else f.get_tensor(name).reshape(-1)[start:stop]
            row = 1
            for d in shape[1:]:
                row *= d
            first, last = start // row, -(-stop // row)
            block = part[first:last].reshape(-1)
            return block[start - first * row : stop - first * row]
