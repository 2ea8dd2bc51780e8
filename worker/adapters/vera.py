"""PEFT VeRA adapters as merge inputs: each module's update as a LoRA pair.

A VeRA module's update is ΔW = diag(λ_b) B diag(λ_d) A, with A and B slices of projections
shared by every layer (PEFT: ``vera_A[:, :in_features]``, ``vera_B[:out_features, :]``). So
A′ = diag(λ_d) A, B′ = diag(λ_b) B is a LoRA pair with scaling 1, and it enters core space like
any LoRA (docs/methods.md, last line).

The adapter file holds λ_b (out) and λ_d (r) per module, and the projections only when saved
with ``save_projection=True``; otherwise they are regenerated from ``projection_prng_key``
with PEFT's own initialisation code. Neither form records a module's input size, which the
slice of ``vera_A`` needs: it comes from a LoRA adapter of the same job that has the module,
or from the base model's config (see ``worker.adapters.base_model``); both are looked up when
the reader is opened (``worker.adapters.opening``), so its modules are complete from the
start.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from jobs.errors import AdapterInvalid, LimitExceeded, reason

from .base_model import BaseModelRefused, linear_input_sizes
from .config import LoraAdapterConfig
from .factors import check_finite, read_after_close, sha256_file
from .format import (
    VERA_LAMBDA_KEY,
    VERA_PROJECTIONS,
    WEIGHTS_NAME,
    check_weights_file,
    vera_lambda_keys,
)
from .header import held_for_header, read_header
from .source import InputSizes, ModuleInfo

__all__ = ["MAX_VERA_BYTES", "VeraReader", "check_vera_size", "vera_input_sizes"]

F32 = 4
#: The largest VeRA weights file read. VeRA stores two vectors per module and, at most, two
#: projections shared by every layer: a 70B-parameter model at r = 256 needs under 100 MB.
#: A remote one is copied to the worker's disk whole, so its size is checked (from the HEAD)
#: before the copy.
MAX_VERA_BYTES = 256 << 20
#: Bytes per value of safetensors dtypes (an unknown one counts as 8, the widest).
_ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def check_vera_size(name: str, nbytes: int) -> None:
    """Refuse VeRA weights over :data:`MAX_VERA_BYTES` (before a remote one is copied)."""
    if nbytes > MAX_VERA_BYTES:
        raise LimitExceeded(
            f"adapter {name!r}: a VeRA adapter's {WEIGHTS_NAME} of {nbytes} bytes, over the "
            f"limit of {MAX_VERA_BYTES} (VeRA weights are vectors and two shared projections)"
        )


def vera_input_sizes(
    name: str, config: LoraAdapterConfig, modules: Sequence[str], known: InputSizes
) -> InputSizes:
    """Each module's input size: from ``known``, else from the base model's local config; a
    clear error when neither knows."""
    missing = [m for m in modules if m not in known]
    sizes = {m: known[m] for m in modules if m in known}
    if missing:
        try:
            from_base = linear_input_sizes(
                config.base_model_name_or_path, config.base_model_class, missing
            )
        except BaseModelRefused as exc:
            raise AdapterInvalid(f"adapter {name!r}: {exc}") from None
        if from_base is None:
            raise AdapterInvalid(
                f"adapter {name!r}: a VeRA adapter does not record its layers' input sizes, "
                f"and neither a LoRA input of this job nor a local base model config "
                f"(base_model_name_or_path={config.base_model_name_or_path!r}) gives them for "
                f"{len(missing)} module(s), e.g. {missing[0]!r}"
            )
        sizes.update(from_base)
    return sizes


class VeraReader:
    """A PEFT VeRA adapter on local disk (an ``AdapterSource``). ``known_input_sizes`` gives
    modules' input sizes (a LoRA input of the same job); the rest come from the base model's
    local config (:func:`vera_input_sizes`). ``max_modules`` bounds the header
    (``worker.adapters.header``)."""

    streamed = False  # a local file (an S3 VeRA adapter is copied whole first: it is small)

    def __init__(
        self,
        directory: Path,
        name: str,
        config: LoraAdapterConfig,
        known_input_sizes: InputSizes,
        *,
        max_modules: int | None = None,
    ) -> None:
        self.directory, self.name, self.config = Path(directory), name, config
        check_weights_file(self.directory, name)
        self.path = self.directory / WEIGHTS_NAME
        self.nbytes = self.path.stat().st_size
        check_vera_size(name, self.nbytes)
        self._projections: tuple[torch.Tensor, torch.Tensor] | None = None
        self._projections_lock = threading.Lock()  # modules are read from several threads
        self._closed = False
        entries, header_bytes = read_header(self.path, name, self.nbytes, max_modules)
        header = {k: list(e.shape) for k, e in entries.items()}
        self._itemsizes = {k: _ITEMSIZES.get(e.dtype, 8) for k, e in entries.items()}
        self.saved_projection_shapes = self._check_projections(header)
        lambdas: dict[str, dict[str, list[int]]] = {}
        for key, shape in header.items():
            if key in VERA_PROJECTIONS:
                continue
            match = VERA_LAMBDA_KEY.match(key)
            if match is None or len(shape) != 1:
                raise AdapterInvalid(
                    f"adapter {name!r}: tensor {key!r} is not a VeRA vector "
                    "(base_model.model.<module>.vera_lambda_{b,d})"
                )
            lambdas.setdefault(match["module"], {})[match["which"]] = shape
        for module, pair in lambdas.items():
            if set(pair) != {"b", "d"} or pair["d"][0] != config.r:
                raise AdapterInvalid(
                    f"adapter {name!r}: module {module!r} needs vera_lambda_b and a vera_lambda_d "
                    f"of length r = {config.r}"
                )
        if not lambdas:
            raise AdapterInvalid(f"adapter {name!r}: {WEIGHTS_NAME} holds no VeRA vectors")
        sizes = vera_input_sizes(name, config, list(lambdas), known_input_sizes)
        self.modules: dict[str, ModuleInfo] = {
            module: self._module_info(module, sizes[module], pair["b"][0])
            for module, pair in lambdas.items()
        }
        self.held_bytes = self._projection_bytes() + held_for_header(header_bytes)

    def _check_projections(
        self, header: dict[str, list[int]]
    ) -> tuple[list[int], list[int]] | None:
        present = [k for k in VERA_PROJECTIONS if k in header]
        if self.config.save_projection != bool(present) or len(present) == 1:
            raise AdapterInvalid(
                f"adapter {self.name!r}: save_projection={self.config.save_projection} but the "
                f"file holds {present or 'no projections'}"
            )
        if not present:
            return None
        shape_a, shape_b = header[VERA_PROJECTIONS[0]], header[VERA_PROJECTIONS[1]]
        if (
            len(shape_a) != 2
            or len(shape_b) != 2
            or shape_a[0] != self.config.r
            or shape_b[1] != self.config.r
        ):
            raise AdapterInvalid(
                f"adapter {self.name!r}: projections of shapes {shape_a} and {shape_b} do not "
                f"match r = {self.config.r}"
            )
        return shape_a, shape_b

    def _module_info(self, module: str, n: int, m: int) -> ModuleInfo:
        """``module``'s LoRA view: rank r, n inputs, m outputs, scaling 1; refused when the
        saved projections are too small for it."""
        saved = self.saved_projection_shapes
        if saved is not None and n > saved[0][1]:
            raise AdapterInvalid(
                f"adapter {self.name!r}: module {module!r} has {n} inputs but the saved "
                f"vera_A has only {saved[0][1]} columns"
            )
        if saved is not None and m > saved[1][0]:
            raise AdapterInvalid(
                f"adapter {self.name!r}: module {module!r} has {m} outputs "
                f"but the saved vera_B has only {saved[1][0]} rows"
            )
        return ModuleInfo(
            module, self.config.r, n, m, 1.0, read_bytes=self._read_bytes(module, n, m)
        )

    def _read_bytes(self, module: str, n: int, m: int) -> int:
        """What :meth:`read` allocates: λ_b and λ_d, the saved projections' slices (mapped,
        copied, converted to float32), and the products diag(λ) · projection."""
        r = self.config.r
        key_b, key_d = vera_lambda_keys(module)
        lambdas = m * self._itemsizes.get(key_b, 8) + r * self._itemsizes.get(key_d, 8)
        total = lambdas + F32 * (m + r) + F32 * r * (n + m)
        if self.saved_projection_shapes is not None:
            size_a, size_b = (self._itemsizes[k] for k in VERA_PROJECTIONS)
            stored = r * n * size_a + m * r * size_b
            total += 2 * stored + (F32 * r * (n + m) if (size_a, size_b) != (F32, F32) else 0)
        return total

    def _projection_bytes(self) -> int:
        """vera_A (r × max n) and vera_B (max m × r) in float32, regenerated once and held
        for the whole merge when the file does not hold them; nothing otherwise."""
        if self.saved_projection_shapes is not None:
            return 0
        in_max = max(info.in_features for info in self.modules.values())
        out_max = max(info.out_features for info in self.modules.values())
        return F32 * self.config.r * (in_max + out_max)

    def _regenerated_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """vera_A and vera_B as PEFT draws them: its own ``_kaiming_init``, seeded by the key,
        with the largest input and output sizes among the adapted modules."""
        with self._projections_lock:
            if self._closed:
                raise read_after_close(self.name)
            return self._regenerate_once()

    def _regenerate_once(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._projections is None:
            try:
                from peft.tuners.vera.model import _kaiming_init
            except ImportError as exc:  # the adapter cannot be read without PEFT's own code
                raise AdapterInvalid(
                    f"adapter {self.name!r}: saved without its projections, and PEFT's VeRA "
                    f"initialisation to regenerate them is not importable ({exc})"
                ) from None
            in_max = max(info.in_features for info in self.modules.values())
            out_max = max(info.out_features for info in self.modules.values())
            generator = torch.Generator(device="cpu").manual_seed(self.config.projection_prng_key)
            vera_A = _kaiming_init((self.config.r, in_max), generator=generator)
            vera_B = _kaiming_init((out_max, self.config.r), generator=generator)
            self._projections = (vera_A, vera_B)
        return self._projections

    def read(
        self, module: str, device: torch.device | str = "cpu", *, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A′ = diag(λ_d) vera_A[:, :n] (r × n) and B′ = diag(λ_b) vera_B[:m, :] (m × r), float32.

        ``check`` as in ``AdapterSource.read``.
        """
        if self._closed:
            raise read_after_close(self.name)
        info = self.modules[module]
        n, m = info.in_features, info.out_features
        key_b, key_d = vera_lambda_keys(module)
        try:
            with safe_open(self.path, framework="pt") as f:
                lambda_b, lambda_d = f.get_tensor(key_b), f.get_tensor(key_d)
                if self.saved_projection_shapes:
                    A = f.get_slice(VERA_PROJECTIONS[0])[:, :n]
                    B = f.get_slice(VERA_PROJECTIONS[1])[:m, :]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterInvalid(
                f"adapter {self.name!r}: cannot read module {module!r} ({reason(exc)})"
            ) from None
        if not self.saved_projection_shapes:
            vera_A, vera_B = self._regenerated_projections()
            A, B = vera_A[:, :n], vera_B[:m, :]
        A = (lambda_d.float()[:, None] * A.float()).to(device)
        B = (lambda_b.float()[:, None] * B.float()).to(device)
        if check:
            check_finite(self.name, module, A, B)
        return A, B

    def sha256(self) -> str:
        """The weights file's sha256 (hex), read from disk."""
        return sha256_file(self.path)

    def close(self) -> None:
        """Drop the regenerated projections (no file is held open between reads); final
        (``AdapterSource``)."""
        with self._projections_lock:
            self._closed, self._projections = True, None
