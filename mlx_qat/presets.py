"""The model size presets, apart from mlx_qat.model so that a config names them without importing
mlx_lm (slow to import; only a real run needs it)."""

from typing import Any, Dict

# Size presets (vocabulary comes from the data). N counts the tied embedding once. Heads of 64
# dimensions: MLX's fused Metal attention covers head sizes 64/80/128 (smaller ones run unfused),
# and on the CPU, fewer heads mean a smaller score matrix (half the attention time of 32-dim heads).
PRESETS: Dict[str, Dict[str, Any]] = {
    # nano/micro/mini: sizes for scaling-law sweeps on a CPU (configs/sweep_local.yaml)
    "nano": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=192, num_attention_heads=1, num_key_value_heads=1),
    "micro": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=384, num_attention_heads=2, num_key_value_heads=2),
    "mini": dict(hidden_size=192, num_hidden_layers=2, intermediate_size=576, num_attention_heads=3, num_key_value_heads=3),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, intermediate_size=384, num_attention_heads=2, num_key_value_heads=2),
    "small": dict(hidden_size=256, num_hidden_layers=6, intermediate_size=768, num_attention_heads=4, num_key_value_heads=4),
    "base": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8),
}
NAMES = ", ".join(PRESETS)  # as --help and error messages list them
