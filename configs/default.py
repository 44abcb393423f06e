"""Training config. `--config=configs/default.py` is the paper's DiT-XL/2 ImageNet-256 recipe;
`--config=configs/default.py:cpu` a DiT-Mi/4 (6 blocks, width 192) on scikit-learn's 8x8 digits
upscaled to 16x16 that trains in a few minutes on a laptop CPU; `:cpu_text` the same DiT with
cross-attention to captions ("a handwritten digit seven") instead of class labels, sampled from prompts
by tools/sample_prompt.py. Any field can be overridden on the command line: `--config.batch_size=64`.
"""
import ml_collections

from dit_jax.data import sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The config of preset `arg`: '' / 'paper' (DiT-XL/2 on latents), 'cpu' (tiny, digits) or
  'cpu_text' (tiny, digits with captions)."""
  if arg not in ("", "paper", "cpu", "cpu_text"):
    raise ValueError(f"unknown preset {arg!r}; use 'paper' (default), 'cpu' or 'cpu_text'")
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds the parameters, the per-step noise/t/label-dropout keys and the data order.

  # Model.
  config.model = "DiT-XL/2"  # 'DiT-<S|B|L|XL|Ti|Mi|Nano>/<patch>' (dit.SIZES).
  config.depth = 0  # Overrides the named size's depth (0 = the table's), for off-table sweeps.
  config.hidden_size = 0  # Overrides the named size's width (0 = the table's).
  config.num_heads = 0  # Overrides the named size's head count (0 = the table's).
  config.conditioning = "adaln_zero"  # adaln_zero | adaln | cross_attn | in_context (paper Fig. 5).
  config.class_conditional = True  # False trains an unconditional model (no label embedding).
  config.class_dropout_prob = 0.1  # Label dropout to the null class, for classifier-free guidance.
  config.learn_sigma = True  # Learned variance (LEARNED_RANGE) with the hybrid MSE + VLB loss.
  config.dtype = "bfloat16"  # Compute dtype (activations, matmuls); params stay param_dtype.
  config.param_dtype = "float32"  # Params and optimizer state (fp32 master weights).
  # auto: by backend (attention.choose: cuDNN's fused attention on NVIDIA GPUs where it applies,
  # XLA's on TPUs, dit_jax.models.attention's on the CPU); '': dit_jax.models.attention;
  # 'xla'/'cudnn': jax.nn.dot_product_attention's.
  config.attention_impl = "auto"
  config.scan_layers = True  # nn.scan over blocks: one compiled block, much faster compiles.
  config.remat = False  # Recompute block activations in the backward pass (saves memory).
  # sp: the paper's standard parameterisation. mup: μP (dit_jax/models/mup.py): per-parameter init
  # and Adam lr scaled by width / mup.base_width, so one optim.lr transfers across widths; width
  # grows through heads at a fixed head size. DiT only.
  config.parameterization = "sp"
  config.mup = ml_collections.ConfigDict()
  config.mup.base_width = 0  # The width at which μP equals SP (a multiple of the head size).

  # Diffusion.
  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.schedule = "linear"  # Beta schedule: linear (1e-4 -> 0.02, DiT) or cosine.
  config.diffusion.timesteps = 1000  # T of the training process.
  config.diffusion.prediction = "eps"  # What the network predicts: eps | x0 | v.
  config.diffusion.objective = "ddpm"  # ddpm (the paper's) | flow (rectified flow, SiT / SD3).

  # The flow objective (dit_jax/objectives/flow.py), used when diffusion.objective = 'flow'.
  config.flow = ml_collections.ConfigDict()
  config.flow.path = "linear"  # linear (rectified flow) | gvp (SiT's variance-preserving path).
  config.flow.prediction = "velocity"  # velocity | noise | data.
  config.flow.time_sampling = "uniform"  # uniform | logit_normal (SD3).
  config.flow.logit_mean = 0.0  # SD3's m of the logit-normal (on the noise level 1 - t).
  config.flow.logit_std = 1.0  # SD3's s of the logit-normal.
  config.flow.shift = 1.0  # SD3's timestep shift of training times (> 1: noisier).
  config.flow.sampler = "heun"  # euler | heun (ODE) | euler_maruyama (SiT's SDE).
  config.flow.guidance_interval = (0.0, 1.0)  # Guide only for t in [lo, hi] (flow time, 0 = noise).

  # Data (see sources.default_data_config for every field).
  config.data = sources.default_data_config()
  config.data.name = "latents"  # ImageNet latents from tools/extract_latents.py.
  config.data.path = ""  # The latents directory (required for the paper preset).
  config.data.image_size = 0  # 0 = whatever the latents were extracted at (256 px -> 32x32x4).
  config.data.flip = True  # Horizontal flips, the paper's only augmentation.

  # Text conditioning (captions.py): captions of the class labels replace the labels; the model is a
  # caption encoder (text.TextEncoder) whose tokens the DiT (conditioning='cross_attn') or U-Net
  # cross-attends to. The tokenizer is saved as workdir/tokenizer.json.
  config.text = ml_collections.ConfigDict()
  config.text.enabled = False  # Train on captions (token ids) instead of class labels.
  config.text.template = ""  # Caption of a class, '{}' = its name ('' = text.TEMPLATES[data.name]).
  config.text.width = 128  # Caption encoder width (= the backbone's context_dim).
  config.text.depth = 2  # Caption encoder transformer layers.
  config.text.num_heads = 4  # Caption encoder attention heads.
  config.text.caption_dropout_prob = 0.1  # Captions dropped to the empty one, for guidance.
  config.text.max_length = 0  # Tokens per caption with <bos> (0 = the longest caption's).

  # Optimisation (paper: AdamW lr 1e-4 constant, no weight decay, no warm-up, batch 256).
  config.batch_size = 256  # Global batch over all devices and processes.
  config.num_train_steps = 400_000  # Paper's FID-50K comparisons are at 400K steps.
  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-4  # Peak (and constant) learning rate.
  config.optim.weight_decay = 0.0  # Decoupled AdamW weight decay.
  config.optim.b1 = 0.9  # Adam beta1 (torch default).
  config.optim.b2 = 0.999  # Adam beta2 (torch default).
  config.optim.eps = 1e-8  # Adam epsilon (torch default).
  config.optim.warmup_steps = 0  # Linear warm-up from 0 over this many steps (0 = none).
  # After the warm-up: constant (the paper's) | cosine (to 0 at num_train_steps) | cooldown
  # (constant, then linear to 0 over the last cooldown_fraction of num_train_steps).
  config.optim.schedule = "constant"
  config.optim.cooldown_fraction = 0.2  # The cool-down's share of the run (schedule cooldown).
  config.optim.grad_clip = 0.0  # Clip gradients to this global norm (0 = off).
  config.ema_decay = 0.9999  # EMA of the params; evaluation and sampling use the EMA.
  # Post-hoc EMA (EDM2, dit_jax/training/phema.py): power-function EMAs tracked during training,
  # saved as snapshots, and any profile reconstructed from them after training.
  config.ema = ml_collections.ConfigDict()
  # σ_rel of the tracked power-function EMAs, e.g. (0.05, 0.10); the last one is evaluated during
  # training. () = off: the traditional ema_decay EMA only (the paper's).
  config.ema.sigma_rels = ()
  config.ema.num_snapshots = 16  # Snapshots at every ceil(num_train_steps / N) steps and the last.
  # σ_rel reconstructed after training and scored on the validation loss; the best is evaluated.
  config.ema.candidates = (0.015, 0.025, 0.05, 0.075, 0.10, 0.15, 0.20)
  config.max_nonfinite_streak = 10  # Stop after this many consecutive skipped (NaN/inf) updates.

  # Parallelism.
  config.mesh_shape = (-1, 1, 1)  # (data, fsdp, tensor) sizes; one may be -1 (= the rest).
  config.logical_axis_rules = ()  # ((logical, mesh axis or None), ...); () = sharding.DEFAULT_RULES.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.auto = True  # jax.distributed.initialize() when SLURM / a TPU pod is detected.
  config.distributed.coordinator_address = ""  # 'host:port' to initialise explicitly instead.
  config.distributed.num_processes = 1  # With coordinator_address: number of processes.
  config.distributed.process_id = 0  # With coordinator_address: this process's index.

  # Logging, checkpoints, evaluation.
  config.log_every_steps = 100  # Metrics (loss, steps/s, images/s, MFU) to TensorBoard + jsonl.
  config.peak_tflops_per_device = 0.0  # Peak TFLOP/s for MFU; 0 = look up by device kind.
  config.checkpoint_every_steps = 10_000  # Save the whole train state + data position (0 = never).
  config.keep_checkpoints = 3  # Keep the newest N checkpoints.
  config.async_checkpoints = True  # Write checkpoints in the background.
  config.record_batch_hashes = False  # Append each batch's sha256 to batch_hashes.<proc>.jsonl.
  config.eval = ml_collections.ConfigDict()
  config.eval.vae_path = ""  # diffusers SD-VAE folder that decodes latent samples ('' = no decoding).
  # Clip x0 predictions to [-1, 1] while sampling (DDPM): auto = on for pixels (ADM), off for
  # latents (DiT's clip_denoised=False); on | off force it.
  config.eval.clip_denoised = "auto"
  config.eval.seed = 0  # Evaluation noise and labels: common to every member and training seed.
  # The sample grid (evaluators.SampleGrid): a PNG of EMA samples, labels 0, 1, 2, ...
  config.eval.grid = ml_collections.ConfigDict()
  config.eval.grid.every_steps = 50_000  # Every N steps and at the end (0 = never).
  config.eval.grid.num_samples = 16  # Images in the grid.
  config.eval.grid.respacing = "250"  # Sampling steps (DDPM respacing, paper: 250; flow: N steps).
  config.eval.grid.cfg_scale = 4.0  # Classifier-free guidance (1 = none; the paper's figures: 4).
  config.eval.grid.guide_channels = 0  # Guide only the first N eps channels (0 = all; official: 3).
  # Sample quality (evaluators.SampleQuality): FID/sFID/IS/precision/recall of EMA samples.
  config.eval.fid = ml_collections.ConfigDict()
  config.eval.fid.every_steps = 50_000  # Every N steps and at the end (0 = never).
  config.eval.fid.num_samples = 0  # Samples scored (0 = off; the paper: 50_000).
  config.eval.fid.batch_size = 64  # Sampling/feature batch (global).
  config.eval.fid.respacing = "250"  # Sampling steps (DDPM respacing, paper: 250; flow: N steps).
  config.eval.fid.cfg_scale = 1.5  # Guidance (1 = none: Table 4 and Fig. 8; 1.5: the paper's best).
  config.eval.fid.guide_channels = 0  # Guide only the first N eps channels (0 = all; official: 3).
  config.eval.fid.feature_network = "auto"  # inception | cnn (per-dataset net) | auto (by size).
  config.eval.fid.reference = ""  # Reference statistics .npz ('' = computed from the training data).
  config.eval.fid.reference_size = 10_000  # Training images in a computed reference (0 = all).
  config.eval.fid.cache_dir = ""  # Feature nets and references cache ('' = ~/.cache/dit_jax).
  config.eval.fid.kid_subsets = 100  # KID: random subsets averaged (torch-fidelity's default).
  config.eval.fid.kid_subset_size = 1000  # KID subset size, capped at min(it, samples, reference).
  config.eval.fid.fid_inf_points = 10  # FID∞: sample counts n/4..n fit on 1/N (0 = off).
  # Validation loss (evaluators.ValidationLoss) on the held-out split of data.val_size examples.
  config.eval.val = ml_collections.ConfigDict()
  config.eval.val.every_steps = 0  # Every N steps and at the end (0 = never; needs data.val_size).
  config.eval.val.num_examples = 256  # Held-out examples scored (at most data.val_size).
  config.eval.val.num_timesteps = 8  # Fixed stratified times per example (the same for every run).
  config.eval.val.batch_size = 256  # Examples x times per forward batch.

  if arg in ("cpu", "cpu_text"):
    config.model = "DiT-Mi/4"
    config.dtype = "float32"
    config.scan_layers = False
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.flip = False  # digits are not mirror-symmetric
    config.batch_size = 64
    config.num_train_steps = 400
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.ema_decay = 0.99
    config.log_every_steps = 25
    config.checkpoint_every_steps = 100
    config.eval.grid.every_steps = 400
    config.eval.grid.respacing = "50"
    config.eval.grid.cfg_scale = 2.0
    config.eval.fid.every_steps = 400
    config.eval.fid.respacing = "50"
    config.eval.fid.num_samples = 512  # scored with a CNN trained once on the digits
    config.eval.fid.batch_size = 128
  if arg == "cpu_text":  # the grid's rows: "a handwritten digit zero", "... one", ...
    config.conditioning = "cross_attn"
    config.text.enabled = True
    config.text.width = 64
  return config
