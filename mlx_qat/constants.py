"""Values that several modules share, kept free of MLX so that the planner (numpy and scipy
alone) reads the same bit widths as the quantizers."""

# The weight bit widths QAT supports; 1.58 is ternary. quantizers.QUANTIZERS serves each with one kind.
BITS = (1, 1.58, 2, 3, 4, 5, 6, 8)
# Inputs that share one learned scale; null (None) in a config means one scale per output channel.
GROUP_SIZES = (32, 64, 128)
# MLX's quantization modes: affine (the integer grids above, with learned scales) and its
# microscaling floating-point formats, each with one fixed (group size, element bits): mode -> (G, B).
FP_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
MODES = ("affine", *FP_MODES)
# The dtypes an export may store its scales in (export.SCALES_DTYPES maps them to MLX's).
SCALES_DTYPE_NAMES = ("float32", "float16", "bfloat16")
# sentencepiece's byte fallback alone takes 259 pieces (256 bytes, <unk>, <s>, </s>), and any text
# needs at least one character piece besides.
BYTE_FALLBACK_PIECES = 259
MIN_VOCAB_SIZE = BYTE_FALLBACK_PIECES + 1
# The vocabulary a tokenizer is trained to when neither a config nor the command line says.
DEFAULT_VOCAB_SIZE = 2048
