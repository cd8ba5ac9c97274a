"""Linear layers whose output rows do not depend on the step they are computed in.

Why: library GEMMs (oneDNN, MKL) choose their kernel and their blocking over the
reduction dimension by the number of rows, so a prompt token computed inside a
512-token prefill and the same token computed alone in a decode step (or after a
prefix-cache hit, or in a chunk) differ in the last bits, and a near-tie in the
logits then flips a token. ``shard/numerics/kernels/linear.c`` computes every output element
as one fused multiply-add chain over the input dimension in a fixed order,
whatever the number of rows, the row's place among them, or the thread count. On
CPUs with AVX512-BF16, bf16 activations multiply by VDPBF16PS instead (pairs of
exact bf16 products, 4-/8-bit weights group by group): twice the multiply-adds
per instruction, in an order just as fixed.

Every ``nn.Linear`` of a CPU model is replaced by an ``InvariantLinear`` holding
its weight packed once into the kernel's column tiles: fp32 or bf16 as loaded
(float16 is stored as float32, exactly), or 4-/8-bit values with per-group scales
(``shard.numerics.quantization``: storage only, unpacked to fp32 before any product). The
packed weight replaces the plain one; the layer's ``weight`` is a meta tensor of
the original shape and dtype, so model code that reads them still works and code
that would compute with them fails loudly.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch
from torch import nn

from shard.numerics.kernels import load_library
from shard.numerics.quantization import STORAGES, QuantizedWeight

log = logging.getLogger(__name__)

#: The kernel's type codes (``enum`` in linear.c): activations fp32/bf16; plain weights too.
ACTIVATION_CODES = {torch.float32: 0, torch.bfloat16: 1}
TYPE_CODES = {**ACTIVATION_CODES, torch.uint8: 2, torch.int8: 3}
#: Quantized weights by storage (bits, group, k-quant factors): INT4 (two 4-bit values a byte)
#: and INT8 with fp32 scales and offsets per group; the k-quants K4, K5, K6 with their factors.
#: STORAGES lists them in the order of linear.c's enum, from INT4 = 2 on.
QUANTIZED_CODES = {storage: code for code, storage in enumerate(STORAGES, start=2)}
#: Added to a weight's code: its products take linear.c's int8-activation path (x quantized per row in
#: blocks of 32, integer products; see ``quantize_activations``). For the storages of unsigned values
#: below 64: the 4-bit ones and the k-quants.
INT8_ACTIVATIONS = 16
INT8_ACTIVATION_STORAGES = tuple(s for s in STORAGES if s[0] <= 6)


class LinearKernel:
    """ctypes binding of linear.c."""

    def __init__(self, library: ctypes.CDLL):
        self._function = library.invariant_linear
        self._function.restype = ctypes.c_int
        self._function.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_int,
        ]  # fmt: skip
        library.linear_tile_columns.restype = ctypes.c_int
        #: Output columns per packed tile in this build (16 or 32, by instruction set).
        self.tile = int(library.linear_tile_columns())
        self._gather = library.linear_gather_rows
        self._gather.restype = ctypes.c_int
        self._gather.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_int]  # fmt: skip
        self._quad_layout = library.linear_quad_layout
        self._quad_layout.restype = ctypes.c_int
        self._quad_layout.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_int]  # fmt: skip
        library.linear_bf16_dot.restype = ctypes.c_int
        #: Whether bf16 activations with bf16 or 4-/8-bit weights multiply by VDPBF16PS (AVX512-BF16
        #: builds: pairs of exact bf16 products, see linear.c) rather than by fp32 FMAs.
        self.bf16_dot = bool(library.linear_bf16_dot())

    def tiles(self, matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[out, cols] -> [tiles, cols, tile] in ``dtype``, rows past ``out`` zero."""
        out_features, cols = matrix.shape
        tiles = -(-out_features // self.tile)
        padded = matrix.new_zeros((tiles * self.tile, cols), dtype=dtype)
        padded[:out_features] = matrix
        return padded.view(tiles, self.tile, cols).transpose(1, 2).contiguous()

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """A plain weight [out, in]: bf16 stays bf16, the rest becomes fp32 (exactly)."""
        return self.tiles(weight, weight.dtype if weight.dtype == torch.bfloat16 else torch.float32)

    def pack_quantized(self, weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values, scales, offsets): int8, or 4-bit values two a byte (byte j: column j in the
        low nibble, column j + tile/2 in the high one; see linear.c), then for 5-/6-bit ones their
        high bits' plane. A k-quant's scales are its factors' bytes per tile, with no offsets."""
        if weight.bits == 8:
            return (
                self.tiles(weight.q, torch.int8),
                self.tiles(weight.scale, torch.float32),
                self.tiles(weight.offset, torch.float32),
            )
        values = self._planes(self.tiles(weight.q, torch.uint8), weight.bits)  # [tiles, in, row bytes]
        if weight.factors is None:
            return values, self.tiles(weight.scale, torch.float32), self.tiles(weight.offset, torch.float32)
        f = weight.factors
        parts = [self.tiles(f.d, torch.float16), self.tiles(f.m, torch.float16), self.tiles(f.sc, torch.int8),
                 self.tiles(f.mc, torch.int8)]  # fmt: skip
        blob = torch.cat([p.view(torch.uint8).reshape(p.shape[0], -1) for p in parts], dim=1)
        return values, blob.contiguous(), None

    def _planes(self, q: torch.Tensor, bits: int) -> torch.Tensor:
        """[tiles, in, tile] values of ``bits`` bits -> [tiles, in, row bytes]: the low nibbles two a
        byte, then the bits past 4 of every column packed little-endian (column c at bit h * c)."""
        half = self.tile // 2
        low = q & 15
        nibbles = low[..., :half] | (low[..., half:] << 4)
        extra = bits - 4
        if not extra:
            return nibbles.contiguous()
        high = (q >> 4).reshape(*q.shape[:2], self.tile * extra // 8, 8 // extra)
        plane = torch.zeros(high.shape[:-1], dtype=torch.uint8)
        for i in range(8 // extra):
            plane |= high[..., i] << (i * extra)
        return torch.cat([nibbles, plane], dim=-1).contiguous()

    def __call__(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        scales: torch.Tensor | None,
        offsets: torch.Tensor | None,
        bias: torch.Tensor | None,
        out_features: int,
        residual: torch.Tensor | None = None,
        wtype: int | None = None,
    ) -> torch.Tensor:
        """``x @ W.T + bias`` for a 2-d ``x`` in its dtype (float16 through fp32); with ``residual``
        ([rows, out_features]), ``residual + (x @ W.T + bias)``, the same bits as adding it after.

        Called once per linear layer per step: a one-sequence decode step of a small model is
        ~120 calls of ~100 us, so every microsecond of Python here shows (no torch dispatcher,
        no copies of what is already contiguous). ``wtype``: the weight's code where the caller
        keeps it (a plain weight's otherwise)."""
        result_dtype = x.dtype
        if result_dtype not in TYPE_CODES:
            x = x.float()
        if not x.is_contiguous():
            x = x.contiguous()
        y = x.new_empty((x.shape[0], out_features))
        fused = residual is not None and residual.dtype == y.dtype and residual.shape == y.shape
        if fused and not residual.is_contiguous():  # type: ignore[union-attr]
            residual = residual.contiguous()  # type: ignore[union-attr]
        status = self._function(
            x.data_ptr(), TYPE_CODES[x.dtype], packed.data_ptr(),
            TYPE_CODES[packed.dtype] if wtype is None else wtype, _pointer(scales),
            _pointer(offsets), _pointer(bias), residual.data_ptr() if fused else None,  # type: ignore[union-attr]
            y.data_ptr(), TYPE_CODES[y.dtype], x.shape[0], packed.shape[1], out_features, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"the invariant linear kernel failed with status {status}")
        y = y if y.dtype == result_dtype else y.to(result_dtype)
        return y if fused or residual is None else residual + y

    def quad_layout(self, layer: InvariantLinear) -> torch.Tensor:
        """``layer``'s packed values rewritten in the layout of linear.c's int8 products (the same size)."""
        packed: torch.Tensor = layer._buffers["packed"]  # type: ignore[assignment]
        out = torch.empty_like(packed)
        status = self._quad_layout(
            packed.data_ptr(), layer.wtype, _pointer(layer._buffers["scales"]), layer.in_features, layer.out_features,
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"no int8 products for a {layer.storage} layer of {layer.in_features} inputs")
        return out

    def gather_rows(self, layer: InvariantLinear, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of ``layer``'s weight [out, in] as fp32 [len(ids), in]: the values its products
        use (an embedding table kept as its output head's tiles)."""
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty((ids.numel(), layer.in_features), dtype=torch.float32)
        buffers = layer._buffers
        status = self._gather(
            buffers["packed"].data_ptr(), layer.wtype, _pointer(buffers["scales"]), _pointer(buffers["offsets"]),  # type: ignore[union-attr]
            layer.in_features, layer.out_features, ids.data_ptr(), ids.numel(), out.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise IndexError(f"token ids must be within 0..{layer.out_features - 1}")
        return out


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


@functools.cache
def linear_kernel() -> LinearKernel:
    """The kernel; RuntimeError where it cannot be built: serving without it would silently
    break the reproducibility the API promises."""
    library = load_library("linear")
    if library is None:
        raise RuntimeError("the step-invariant linear kernel could not be built (a C compiler is needed)")
    return LinearKernel(library)


def invariant_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor | None,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """``x @ W.T + bias`` with W packed by ``LinearKernel.pack``/``pack_quantized``; x is 2-d."""
    return linear_kernel()(x, packed, scales, offsets, bias, out_features)


class InvariantLinear(nn.Module):
    """An ``nn.Linear`` computed by the step-invariant kernel."""

    def __init__(self, linear: nn.Linear, kernel: LinearKernel, quantized: QuantizedWeight | None = None):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        scales = offsets = None
        if quantized is None:
            packed = kernel.pack(weight)
        else:
            packed, scales, offsets = kernel.pack_quantized(quantized)
        self.storage = _storage_name(quantized) if quantized else str(packed.dtype).removeprefix("torch.")
        self.wtype = QUANTIZED_CODES[quantized.storage] if quantized else TYPE_CODES[packed.dtype]
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        self.weight = torch.empty_like(weight, device="meta")  # shape and dtype only (see the module doc)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self._product(flat, None)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)`` for 2-d ``x`` and ``residual``, the sum taken as the results are
        stored (the same bits, one pass and one tensor fewer)."""
        return self._product(x, residual)

    def _product(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        buffers = self._buffers  # one dict instead of four nn.Module.__getattr__ lookups
        packed: torch.Tensor = buffers["packed"]  # type: ignore[assignment]
        return linear_kernel()(
            x, packed, buffers["scales"], buffers["offsets"], buffers["bias"], self.out_features, residual, self.wtype
        )

    @property
    def int8_activations(self) -> bool:
        return self.wtype >= INT8_ACTIVATIONS

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"storage={self.storage}" + (", activations=int8" if self.int8_activations else "")
        )


def _storage_name(quantized: QuantizedWeight) -> str:
    """int4 or int8 (groups of 32), int8/16 (groups of 16); q4_k, q5_k, q6_k (k-quants as stored)."""
    if quantized.factors is not None:
        return f"q{quantized.bits}_k"
    return f"int{quantized.bits}" + ("" if quantized.group == 32 else f"/{quantized.group}")


def make_linears_invariant(model: nn.Module, quantized: dict[str, QuantizedWeight] | None = None) -> int:
    """Replaces every plain ``nn.Linear`` of a CPU model by an ``InvariantLinear``; returns how many.

    ``quantized``: layers (by qualified name) stored as 4-/8-bit values (``shard.numerics.quantization``).
    """
    kernel = linear_kernel()
    quantized = quantized or {}
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                qualified = f"{parent_name}.{name}" if parent_name else name
                setattr(parent, name, InvariantLinear(child, kernel, quantized.get(qualified)))
                replaced += 1
    log.info("%d linear layers on the step-invariant kernel (tiles of %d columns)", replaced, kernel.tile)
    return replaced


def quantize_activations(model: nn.Module) -> int:
    """Every step-invariant layer stored as 4-, 5- or 6-bit values multiplies in int8 from now on, on
    its input quantized per row (linear.c, "int8 activations"): faster where the float products
    bound a step, and no longer the float model's exact arithmetic (docs/performance.md,
    "int8 activations"). Returns how many layers switched; others keep their path. Applied after
    loading, so a prepared model cached either way serves both."""
    codes = {QUANTIZED_CODES[s] for s in INT8_ACTIVATION_STORAGES}
    kernel = linear_kernel()
    switched = 0
    for module in model.modules():
        if isinstance(module, InvariantLinear) and module.wtype in codes:
            module.packed = kernel.quad_layout(module)  # values in the order the int8 products read them
            module.wtype += INT8_ACTIVATIONS
            switched += 1
    log.info("%d linear layers multiply in int8 on quantized activations", switched)
    return switched


class _Table:
    """A plain holder: the table's layer is registered where it serves as a head, or nowhere."""

    def __init__(self, layer: InvariantLinear):
        self.layer = layer


class TiledEmbedding(nn.Module):
    """An embedding table kept as a linear layer's packed tiles (a GGUF file's quantized table, shared
    with the output head it is tied to): a lookup gathers its rows with the very values the head's
    products use, which are the de-quantized table's (rounded to ``dtype``, its bits)."""

    def __init__(self, layer: InvariantLinear, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = _Table(layer), dtype
        #: Shape and dtype of the table (a meta tensor: code that reads them still works).
        self.weight = torch.empty((layer.out_features, layer.in_features), dtype=dtype, device="meta")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = linear_kernel().gather_rows(self.table.layer, ids.reshape(-1))
        return rows.to(self.dtype).reshape(*ids.shape, -1)


def embed_as_tiles(model: nn.Module, storage: dict[str, QuantizedWeight]) -> bool:
    """Replaces the model's input embedding by its quantized table where ``storage`` has it: the
    output head's tiles when the two are one tensor (tied), else tiles of its own."""
    get_input, get_output = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    head = get_output() if callable(get_output) else None
    names = {m: n for n, m in model.named_modules()}
    table = storage.get(names.get(embedding, ""))  # type: ignore[arg-type]
    if embedding is None or table is None:
        return False
    if isinstance(head, InvariantLinear) and storage.get(names.get(head, "")) is table:
        layer = head
    else:
        rows, columns = table.q.shape
        layer = InvariantLinear(nn.Linear(columns, rows, bias=False, device="meta"), linear_kernel(), table)
    model.set_input_embeddings(TiledEmbedding(layer, embedding.weight.dtype))  # type: ignore[operator]
    return True
