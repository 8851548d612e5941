"""Dense bit packing: hand-computed bytes, round trips at every width, bad input."""
import pytest
import torch

from eamvit.errors import EamError
from eamvit.ops.pack import pack_bits, packed_size, unpack_bits


@pytest.mark.parametrize("codes,bits,want", [
    # 4 bits: code 2k in the low nibble, 2k+1 in the high one: 0x3 | 0xA << 4 = 0xA3.
    ([0x3, 0xA], 4, [0xA3]),
    ([1, 2, 3], 4, [0x21, 0x03]),
    # 2 bits, LSB first: 1 -> bits 1,0; 2 -> 0,1; 3 -> 1,1: 1 + 8 + 16 + 32 = 57.
    ([1, 2, 3], 2, [57]),
    # 3 bits: 5 | 6 << 3 | 7 << 6 = 501 = 0x1F5 over two bytes.
    ([5, 6, 7], 3, [0xF5, 0x01]),
    # 5 bits: 31 | 1 << 5 = 63 ; 7 bits: 127 | 1 << 7 = 255.
    ([31, 1], 5, [63, 0]),
    ([127, 1], 7, [255, 0]),
    # 6 bits: 0b101010 | 0b000011 << 6 = 0b11_101010 = 234, then 0b0000 = 0.
    ([42, 3], 6, [234, 0]),
    ([200, 7], 8, [200, 7]),
])
def test_hand_checked_bytes(codes, bits, want):
    packed = pack_bits(torch.tensor(codes), bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == want
    assert packed.numel() == packed_size(len(codes), bits)
    assert unpack_bits(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (7, 13), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.numel() == (codes.numel() * bits + 7) // 8  # dense: no padding between codes
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).reshape(7, 13).long(), codes)


def test_bad_input():
    with pytest.raises(EamError, match="lie in"):
        pack_bits(torch.tensor([16]), 4)
    with pytest.raises(EamError, match="lie in"):
        pack_bits(torch.tensor([-1]), 4)
    with pytest.raises(EamError, match="1..8 bits"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(EamError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)
