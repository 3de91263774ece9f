"""Binary codes packed into 64-bit words, the layout the Hamming kernel reads."""

import numpy as np


def n_words(n_bits):
    """Number of 64-bit words holding ``n_bits`` bits."""
    return (n_bits + 63) // 64


def pack_bits(bits):
    """Pack an (n, n_bits) array of 0/1 values into (n, ceil(n_bits / 64)) uint64.

    Bit ``b`` of a code lands in word ``b // 64`` at position ``b % 64``; the
    unused high bits of the last word are zero, so they never add to a
    Hamming distance.

    Parameters
    ----------
    bits : ndarray of shape (n_samples, n_bits)
        Binary codes, any integer, boolean or float dtype holding only 0 and 1.

    Returns
    -------
    packed : ndarray of shape (n_samples, n_words), dtype=uint64, C-contiguous
    """
    bits = np.asarray(bits)
    if bits.ndim != 2:
        raise ValueError(f"binary codes must be a 2-D array; got {bits.ndim} dimension(s).")
    n_samples, n_bits = bits.shape
    if n_bits == 0:
        raise ValueError("binary codes must have at least one bit; got 0 columns.")
    if bits.dtype != np.bool_:
        if bits.size and not ((bits == 0) | (bits == 1)).all():  # np.isin: ~40 us more
            raise ValueError(
                "binary codes must hold only 0 and 1; the quantizer's transform "
                "returned other values. A quantizer searched by Hamming distance "
                "must return one 0/1 column per bit."
            )
        bits = bits.astype(np.bool_)
    n_bytes = 8 * n_words(n_bits)
    packed = np.zeros((n_samples, n_bytes), dtype=np.uint8)
    packed[:, : (n_bits + 7) // 8] = np.packbits(bits, axis=1, bitorder="little")
    return np.ascontiguousarray(packed.view("<u8").astype(np.uint64, copy=False))
