"""W4A16 quantization of a checkpoint on disk, streamed: RTN (bit-identical to AutoRound's RTN) and
GPTQ, written in AutoRound's `auto_round:auto_gptq` packing under the input's own tensor names."""
