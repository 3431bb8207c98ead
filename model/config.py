"""Configs of the Wan2.1 text-to-video model: DiT, Wan-VAE, umT5 encoder, and the presets.

Every number here comes from the original Wan2.1 release (wan/configs/*.py, wan/modules/*.py).
Configs are frozen dataclasses; derived values are properties; an impossible config raises.
Shape names used across the project: B batch, C channels, F H W latent frames/height/width,
T video frames, L video tokens, S text tokens, D model width, N heads.
"""
from dataclasses import dataclass, field

# Per-channel statistics of the Wan-VAE latents (orig wan/modules/vae.py, WanVAE.__init__).
WAN_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
# Wan's default negative prompt (orig wan/configs/shared_config.py), used when none is given.
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                       "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
                       "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
WAN_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 1536                            # D, model width
    ffn_dim: int = 8960                        # hidden width of the GELU-tanh FFN
    num_heads: int = 12                        # N
    num_layers: int = 30
    in_dim: int = 16                           # latent channels in
    out_dim: int = 16                          # velocity channels out
    text_dim: int = 4096                       # umT5 width
    text_len: int = 512                        # text states are zero-padded to exactly this many rows
    freq_dim: int = 256                        # size of the timestep sinusoid
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_max_len: int = 1024                   # rows of the RoPE table per axis
    eps: float = 1e-6                          # every LayerNorm / RMSNorm

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"DiTConfig: head_dim={self.head_dim} must be even (RoPE rotates pairs)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head dims given to the (t, h, w) rotary axes: 44/42/42 for d=128; t takes the remainder."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16                            # latent channels (the encoder outputs 2*z: mean, logvar)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2                    # per encoder stage; the decoder uses one more
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN_LATENT_STD

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("VAEConfig: temporal_downsample needs one entry per downsampling stage "
                             f"({len(self.dim_mult) - 1}), got {len(self.temporal_downsample)}")
        if not len(self.latents_mean) == len(self.latents_std) == self.z_dim:
            raise ValueError(f"VAEConfig: latents_mean/std must have z_dim={self.z_dim} entries")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)   # 8 for Wan

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)  # 4 for Wan: T = 4k+1 frames -> k+1 latent frames


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 256384
    dim: int = 4096                            # d_model
    num_heads: int = 64
    head_dim: int = 64                         # d_kv (dim_attn = num_heads * head_dim)
    ffn_dim: int = 10240                       # gated-GELU hidden width
    num_layers: int = 24
    num_buckets: int = 32                      # relative-position buckets, one bias table per layer
    max_distance: int = 128
    text_len: int = 512                        # prompts are padded / truncated to this many tokens
    eps: float = 1e-6


@dataclass(frozen=True)
class WanConfig:
    """A whole text-to-video model plus its sampling defaults (orig wan/configs + generate.py)."""
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    t5: T5Config = field(default_factory=T5Config)
    fps: int = 16
    num_frames: int = 81                       # 4k+1
    height: int = 480
    width: int = 832
    sample_shift: float = 5.0                  # flow-matching timestep shift at inference
    sample_steps: int = 50
    guidance_scale: float = 5.0
    num_train_timesteps: int = 1000
    negative_prompt: str = WAN_NEGATIVE_PROMPT

    def __post_init__(self):
        if self.dit.in_dim != self.vae.z_dim or self.dit.out_dim != self.vae.z_dim:
            raise ValueError(f"WanConfig: DiT in/out dims ({self.dit.in_dim}/{self.dit.out_dim}) "
                             f"must equal the VAE z_dim ({self.vae.z_dim})")
        if self.dit.text_dim != self.t5.dim:
            raise ValueError(f"WanConfig: DiT text_dim={self.dit.text_dim} != umT5 dim={self.t5.dim}")
        if self.dit.text_len != self.t5.text_len:
            raise ValueError(f"WanConfig: DiT text_len={self.dit.text_len} != tokenizer text_len={self.t5.text_len}")


PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(),
    "wan2.1-t2v-14b": WanConfig(dit=DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)),
    # A few-thousand-parameter model with every code path of the real one, for the tests.
    "tiny": WanConfig(
        dit=DiTConfig(dim=24, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4,
                      text_dim=32, text_len=16, freq_dim=32, rope_max_len=32),
        vae=VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                      latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0)),
        t5=T5Config(vocab_size=256, dim=32, num_heads=4, head_dim=8, ffn_dim=64, num_layers=2,
                    text_len=16),
        num_frames=9, height=32, width=32, sample_steps=10),
    # The project's pretrained miniature Wan for the sprite world (toy/world.py), stored in
    # toy/checkpoint/ and made by toy/pretrain.py: same code, sizes chosen so that one stage of
    # Set-and-Sequence trains in minutes on a 2-core CPU. 64x64x17 video -> 16x5x8x8 latents -> 80 tokens.
    "toy": WanConfig(
        # 1.26M parameters; text_len 32 covers the longest world caption (26 tokens + </s>).
        dit=DiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, in_dim=16, out_dim=16,
                      text_dim=128, text_len=32),
        # The real strides (8x spatial, 4x temporal) at 1/6 of Wan's width; latent stats measured by
        # `python -m toy.pretrain --part latents` over the DiT's 3000 training clips + 3000 frames.
        vae=VAEConfig(base_dim=16, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1,
                      latents_mean=(0.0239, 0.2493, -0.177, 0.0208, -0.2506, 0.1353, -0.2254, 0.0605,
                                    -0.3054, -0.511, 0.1966, 0.1002, -0.0003, 0.0002, 0.3379, 0.1063),
                      latents_std=(0.8053, 0.8743, 1.0182, 1.8472, 0.9126, 0.6644, 0.663, 1.5433,
                                   1.2368, 1.156, 0.6369, 0.6076, 1.0369, 0.9233, 0.5548, 1.1315)),
        # A word-level sentencepiece vocabulary (98 pieces) plus T5's 100 sentinel ids.
        t5=T5Config(vocab_size=198, dim=128, num_heads=4, head_dim=32, ffn_dim=256, num_layers=2,
                    text_len=32),
        fps=8, num_frames=17, height=64, width=64, sample_shift=2.0, sample_steps=25, guidance_scale=5.0,
        # CFG's unconditional branch is the empty caption the toy pretraining drops 10% of captions to;
        # Wan's Chinese negative prompt is out of the toy vocabulary (all <unk>) and skews colours.
        negative_prompt=""),
}
