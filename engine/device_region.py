"""Device memory whose physical pages can be given back and mapped again at the same virtual addresses (CUDA's
virtual memory management, through the driver API). A sleeping engine keeps its weights and KV cache in such regions
so that the CUDA graphs captured on their addresses replay after a wake, instead of being captured again (vLLM's
CuMemAllocator does the same for its sleep mode). torch's allocator knows nothing of these pages: tensors over them
are views made from the raw address, valid while the region is mapped.
"""

from __future__ import annotations

import ctypes
import functools

import torch


class RegionError(RuntimeError):
    """The driver refused (no VMM support, out of memory): the caller keeps to torch's allocator."""


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compression_type", ctypes.c_ubyte), ("gpu_direct_rdma_capable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requested_handle_types", ctypes.c_int), ("location", _Location),
                ("win32_handle_metadata", ctypes.c_void_p), ("alloc_flags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_ALLOCATION_PINNED, _LOCATION_DEVICE, _ACCESS_READ_WRITE, _GRANULARITY_MINIMUM = 1, 1, 3, 0
_U64, _SIZE = ctypes.c_uint64, ctypes.c_size_t


@functools.cache
def _driver() -> ctypes.CDLL:
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RegionError(f"no CUDA driver library: {e}") from None
    signatures = {
        "cuMemGetAllocationGranularity": [ctypes.POINTER(_SIZE), ctypes.POINTER(_AllocationProp), ctypes.c_int],
        "cuMemAddressReserve": [ctypes.POINTER(_U64), _SIZE, _SIZE, _U64, _U64],
        "cuMemAddressFree": [_U64, _SIZE],
        "cuMemCreate": [ctypes.POINTER(_U64), _SIZE, ctypes.POINTER(_AllocationProp), _U64],
        "cuMemRelease": [_U64],
        "cuMemMap": [_U64, _SIZE, _SIZE, _U64, _U64],
        "cuMemUnmap": [_U64, _SIZE],
        "cuMemSetAccess": [_U64, _SIZE, ctypes.POINTER(_AccessDesc), _SIZE],
        "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    }
    for name, argtypes in signatures.items():
        getattr(cuda, name).argtypes, getattr(cuda, name).restype = argtypes, ctypes.c_int
    return cuda


def _check(result: int, what: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(text))
        raise RegionError(f"{what}: CUDA error {result} ({(text.value or b'?').decode()})")


class _ArrayInterface:
    """What `torch.as_tensor` reads to view device memory it did not allocate (numba's protocol)."""

    def __init__(self, address: int, num_bytes: int):
        self.__cuda_array_interface__ = {"shape": (num_bytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None}


class DeviceRegion:
    """`num_bytes` (rounded up to the driver's granularity) of reserved addresses on `device`, mapped to physical
    memory at creation; `unmap` gives the memory back and `map` takes new memory at the same addresses (its
    contents undefined)."""

    def __init__(self, num_bytes: int, device: torch.device):
        torch.cuda.init()  # the driver calls need the context torch makes current
        self.device = device
        ordinal = device.index if device.index is not None else torch.cuda.current_device()
        self._prop = _AllocationProp(type=_ALLOCATION_PINNED, location=_Location(_LOCATION_DEVICE, ordinal))
        self._access = _AccessDesc(location=_Location(_LOCATION_DEVICE, ordinal), flags=_ACCESS_READ_WRITE)
        granularity = _SIZE()
        _check(_driver().cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(self._prop),
                                                       _GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity")
        self.size = -(-max(num_bytes, 1) // granularity.value) * granularity.value
        address = _U64()
        _check(_driver().cuMemAddressReserve(ctypes.byref(address), self.size, 0, 0, 0), "cuMemAddressReserve")
        self.address = address.value
        self._handle: int | None = None
        try:
            self.map()
        except RegionError:
            _driver().cuMemAddressFree(self.address, self.size)
            raise

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def map(self) -> None:
        if self._handle is not None:
            return
        handle = _U64()
        _check(_driver().cuMemCreate(ctypes.byref(handle), self.size, ctypes.byref(self._prop), 0), "cuMemCreate")
        try:
            _check(_driver().cuMemMap(self.address, self.size, 0, handle.value, 0), "cuMemMap")
            _check(_driver().cuMemSetAccess(self.address, self.size, ctypes.byref(self._access), 1), "cuMemSetAccess")
        except RegionError:
            _driver().cuMemUnmap(self.address, self.size)
            _driver().cuMemRelease(handle.value)
            raise
        self._handle = handle.value

    def unmap(self) -> None:
        """Gives the physical memory back; views of the region must not be used until `map`."""
        if self._handle is None:
            return
        torch.cuda.synchronize(self.device)  # nothing queued may still read or write the pages
        _check(_driver().cuMemUnmap(self.address, self.size), "cuMemUnmap")
        _check(_driver().cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def close(self) -> None:
        self.unmap()
        _check(_driver().cuMemAddressFree(self.address, self.size), "cuMemAddressFree")

    def view(self, offset: int, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        num_bytes = torch.Size(shape).numel() * dtype.itemsize
        if offset + num_bytes > self.size:
            raise ValueError(f"a view of {num_bytes} bytes at {offset} overruns the region's {self.size}")
        raw = torch.as_tensor(_ArrayInterface(self.address + offset, num_bytes), device=self.device)
        return raw.view(dtype).view(shape)


class BumpAllocator:
    """Consecutive views of a region, each aligned for any dtype's vector loads."""

    ALIGNMENT = 256

    def __init__(self, region: DeviceRegion):
        self.region, self.offset = region, 0

    def take(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        view = self.region.view(self.offset, shape, dtype)
        self.offset += aligned(view.numel() * dtype.itemsize)
        return view


def aligned(num_bytes: int) -> int:
    return -(-num_bytes // BumpAllocator.ALIGNMENT) * BumpAllocator.ALIGNMENT
