"""Values that several modules share, kept free of MLX so that the planner (numpy and scipy
alone) reads the same bit widths as the quantizers."""

# The weight bit widths QAT supports; 1.58 is ternary. quantizers.QUANTIZERS serves each with one kind.
BITS = (1, 1.58, 2, 3, 4, 5, 6, 8)
# Inputs that share one learned scale; null (None) in a config means one scale per output channel.
GROUP_SIZES = (32, 64, 128)
# The dtypes an export may store its scales in (export.SCALES_DTYPES maps them to MLX's).
SCALES_DTYPE_NAMES = ("float32", "float16", "bfloat16")
# sentencepiece's byte fallback alone takes 259 pieces (256 bytes, <unk>, <s>, </s>), and any text
# needs at least one character piece besides.
BYTE_FALLBACK_PIECES = 259
MIN_VOCAB_SIZE = BYTE_FALLBACK_PIECES + 1
# The vocabulary a tokenizer is trained to when neither a config nor the command line says.
DEFAULT_VOCAB_SIZE = 2048
