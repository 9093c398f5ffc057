"""The one .npy codec: what the writer writes (header + body, no copy) is what numpy writes and what decode reads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import zstandard

from m3leo_stream import shard_format as sf


@pytest.mark.parametrize("dtype,shape", [("int16", (3, 5, 4)), ("uint8", (1, 2, 2)), ("float32", (2, 3, 3)),
                                         (">u2", (4,)), ("float64", ())])
def test_parts_header_size_and_decode_agree_with_numpy(dtype, shape):
    a = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    header, body = sf.npy_parts(a)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=(1, 0), allow_pickle=False)
    assert header + bytes(body) == sf.encode_array(a) == buf.getvalue()
    assert len(header) == sf.npy_header_size(shape, np.dtype(dtype))
    assert sf.npy_header(header) == (np.dtype(dtype), shape, False, len(header))
    for data, compressed in ((sf.encode_array(a), False),
                             (zstandard.ZstdCompressor().compress(sf.encode_array(a)), True)):
        back = sf.decode_array(data, compressed=compressed)
        assert back.dtype == np.dtype(dtype) and back.shape == shape and np.array_equal(back, a)


def test_parts_do_not_copy_and_make_c_order():
    a = np.zeros((2, 3, 4), np.int16)
    _, body = sf.npy_parts(a)
    assert np.shares_memory(np.frombuffer(body, np.int16), a)
    f = np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    header, body = sf.npy_parts(f)
    assert sf.npy_header(header)[2] is False and bytes(body) == np.ascontiguousarray(f).tobytes()


def test_bad_members_are_format_errors_naming_where():
    a = sf.encode_array(np.ones((2, 2), np.uint8))
    with pytest.raises(sf.FormatError, match="^r/s.tar key k: truncated array: 3 bytes for shape"):
        sf.decode_array(a[:-1], where="r/s.tar key k")
    with pytest.raises(sf.FormatError, match="bad magic"):
        sf.decode_array(b"PK" + a[2:])
    obj = io.BytesIO()
    np.save(obj, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(sf.FormatError, match="object arrays are not allowed"):
        sf.decode_array(obj.getvalue())
    with pytest.raises(sf.FormatError, match="w: cannot decode member"):
        sf.decode_array(a, compressed=True, where="w")
