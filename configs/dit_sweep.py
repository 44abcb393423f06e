"""The scaling sweep: FID against forward Gflops over model size x patch size, at equal steps.

  python -m dit_jax.main --config=configs/dit_sweep.py                 # CPU default (digits, offline)
  python -m dit_jax.main --config=configs/dit_sweep.py:paper --workdir=/gcs/dit_sweep \
      --config.data.path=/gcs/imagenet256_latents --config.eval.vae_path=/gcs/sd-vae-ft-ema \
      --config.eval.fid.reference=/gcs/VIRTUAL_imagenet256_labeled.npz   # pods: launch_tpu_pod.sh
  python -m dit_jax.main --config=configs/dit_sweep.py:mnist --config.sweep.member=3   # one member

Presets: '' / 'cpu' (the default: scikit-learn digits at 16x16, offline, DiT-Femto/Pico/Nano x
patch 8/4/2 and UNet-Pico, 3 seeds per member, two members at a time, one per core, post-hoc EMA,
FID/KID/FID∞ at the end; experiments/cpu_sweep), 'cpu1' (the same with one seed, one member at a
time: the single-seed baseline), 'isoflop' (6 widths at patch 4 x 4 compute budgets x 2 seeds on
the digits, cosine schedule, validation loss; experiments/cpu_isoflop), 'flow_vs_ddpm' (the default grid trained with both
objectives), 'paper' (the DiT paper's 12 models on ImageNet-256 latents, batch 256, 400K steps,
FID-50K with 250 DDPM steps and no guidance; `sweep.seeds` and `sweep.budgets` for pods), 'mnist'
and 'cifar10' (tfds, or local files via --config.data.path), 'folder' (a class-folder dataset at
--config.data.path), 'mup_transfer' (learning rate x width on the digits under SP and μP: does
the best learning rate move with width? experiments/mup).
"""
import importlib.util
import pathlib

import ml_collections


def _sibling(name: str):
  """configs/<name>.py by path, so this file loads from any working directory or script."""
  spec = importlib.util.spec_from_file_location(f"configs.{name}",
                                                pathlib.Path(__file__).with_name(f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


default = _sibling("default")

PRESETS = ("", "cpu", "cpu1", "isoflop", "flow_vs_ddpm", "paper", "mnist", "cifar10", "folder",
           "mup_transfer")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The sweep config of preset `arg`."""
  if arg not in PRESETS:
    raise ValueError(f"unknown sweep preset {arg!r}; choose from {PRESETS}")
  config = default.get_config("paper" if arg == "paper" else "cpu")
  config.workdir = f"workdir/dit_sweep_{arg or 'cpu'}"  # Used when --workdir is not given.
  config.sweep = ml_collections.ConfigDict()
  config.sweep.sizes = ("S", "B", "L", "XL")  # DiT sizes (dit.SIZES rows) crossed with...
  config.sweep.patches = (8, 4, 2)  # ... these patch sizes.
  config.sweep.extra_models = ()  # Further members, e.g. U-Nets ('UNet-B'), on the same curve.
  config.sweep.member = ""  # Run only this member: its index or name (array jobs); '' = all.
  config.sweep.seeds = (0,)  # Training seeds: every model is trained once per seed.
  config.sweep.objectives = ("ddpm",)  # ddpm and/or flow (diffusion.objective) for every model.
  config.sweep.budgets = ()  # Training compute budgets (Gflops): an iso-FLOP sweep (steps per model).
  config.sweep.max_steps = 2_000_000  # Refuse a budget planning a member longer (5x the paper's).
  config.sweep.workers = 0  # Members trained at once, one process per core (0 = in this process).
  # Accelerators per member: on a node with N GPUs (TPU chips) N // k members train at once, each
  # worker seeing only its k devices (dit_jax/sweep/devices.py); 0 = off. Excludes sweep.workers.
  config.sweep.devices_per_member = 0
  config.sweep.parameterizations = ()  # Cross the grid with 'sp'/'mup' (() = config's own).
  config.sweep.lrs = ()  # Cross the grid with these optim.lr values (() = config.optim.lr).
  # The report's fit rules (analysis.laws.Rules), fixed before the run: laws use the seed-mean
  # points at step >= min_fraction x the run's final step and >= min_step (1.0: final points only,
  # no warm-up or early-transient point), and the prediction check fits only the DiTs whose final
  # compute is <= 1/compute_ratio of the held-out DiT's (the largest).
  config.sweep.fit = ml_collections.ConfigDict(dict(min_fraction=1.0, min_step=0,
                                                    compute_ratio=4.0))

  if arg == "paper":
    config.eval.fid.num_samples = 50_000  # FID-50K.
    config.eval.fid.respacing = "250"  # 250 DDPM steps.
    config.eval.fid.cfg_scale = 1.0  # No guidance (Table 4, Fig. 8); the grid keeps 4.0.
    config.eval.fid.every_steps = 50_000
    config.eval.grid.every_steps = 50_000
    return config

  # CPU-sized presets: small models, equal-step training, the dataset CNN as feature network.
  # The default's history (one seed 8.5-14 min, three seeds 27-33 min on 2 cores; at 500 steps FID
  # does not yet order by Gflops) is in experiments/cpu_sweep/README.md. Three widths per patch
  # (Femto, Pico, Nano: 64, 96, 128 at depth 4) so that the prediction check of DiT-Nano/2 has six
  # DiTs at <= 1/4 of its compute to fit (sweep.fit.compute_ratio).
  config.sweep.sizes = ("Femto", "Pico", "Nano")
  config.sweep.extra_models = ("UNet-Pico",)
  config.batch_size = 32
  config.num_train_steps = 1000
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  # EDM2's post-hoc EMA: two tracked power-function EMAs, snapshots, and after training the
  # profile of lowest validation loss among config.ema.candidates (reconstructed) is evaluated.
  config.ema.sigma_rels = (0.05, 0.10)
  config.eval.grid.every_steps = 1000
  config.eval.grid.num_samples = 16
  config.eval.grid.respacing = "25"
  # FID (with KID and FID∞ from the same features) at the end only: the laws use final points
  # (sweep.fit), so an FID at step 500 informed no fit and cost ~7 % of the sweep.
  config.eval.fid.every_steps = 1000
  config.eval.fid.respacing = "25"  # 25 DDPM steps (learned sigma): half the sampling cost of 50.
  config.eval.fid.num_samples = 512
  config.eval.fid.batch_size = 128
  config.eval.fid.cfg_scale = 1.0  # No guidance, as the paper's Table 4.
  # The held-out split and the validation loss (every 250 steps: the learning curves' points).
  config.data.val_size = 256
  config.eval.val.every_steps = 250
  config.eval.val.num_examples = 256
  config.eval.val.num_timesteps = 8
  if arg in ("", "cpu", "flow_vs_ddpm"):
    config.sweep.seeds = (0, 1, 2)
    config.sweep.workers = 2  # small members do not use the second core; two processes do
  if arg == "flow_vs_ddpm":
    config.sweep.objectives = ("ddpm", "flow")
    config.sweep.extra_models = ()
  if arg == "isoflop":
    # One axis: width (dit.SIZES Yocto..Nano: 24-128 at depth 4, 2 heads; 0.05-1.28 M params) at
    # patch 4, 4 budgets 100-2700 Gflops (27x), 2 seeds: 48 runs. Training compute
    # C = 3 x Gflops x batch x steps; each model gets the steps that spend each budget. The lr
    # follows a cosine to 0 at each run's own end (after the 20 warm-up steps), and the EMA is the
    # post-hoc one chosen per run, so neither favours one run length. Scored by the validation
    # loss at each run's end. Rules fixed before the run: experiments/cpu_isoflop/README.md.
    config.sweep.sizes = ("Yocto", "Zepto", "Atto", "Femto", "Pico", "Nano")
    config.sweep.patches = (4,)
    config.sweep.extra_models = ()
    config.sweep.budgets = (100.0, 300.0, 900.0, 2700.0)
    config.sweep.seeds = (0, 1)
    config.sweep.workers = 2
    config.optim.schedule = "cosine"
    config.eval.fid.every_steps = 0
    config.eval.grid.every_steps = 0
    config.checkpoint_every_steps = 5000
    config.log_every_steps = 250
  if arg == "mup_transfer":
    # The μP ladder (dit.SIZES Mu1-Mu4: depth 2, widths 64-256 through 1-4 heads of 64) at patch
    # 4, six learning rates a factor 2 apart, 2 seeds, SP and μP (base width 64 = Mu1, where both
    # are the same model): 96 members, the validation loss after 300 steps. Rules fixed before the
    # run, results and verdict: experiments/mup/README.md (31 min with 2 workers on the 2-core
    # machine shared with two other jobs, 197 GFLOP/s numpy fp32 matmul).
    config.sweep.sizes = ("Mu1", "Mu2", "Mu3", "Mu4")
    config.sweep.patches = (4,)
    config.sweep.extra_models = ()
    config.sweep.seeds = (0, 1)
    config.sweep.parameterizations = ("sp", "mup")
    config.sweep.lrs = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
    config.sweep.workers = 2
    config.ema.sigma_rels = ()  # as committed: the traditional EMA (decay 0.99)
    config.parameterization = "mup"  # the preflight checks the μP fields of every model
    config.mup.base_width = 64
    config.num_train_steps = 300
    config.checkpoint_every_steps = 0
    config.eval.fid.every_steps = 0
    config.eval.grid.every_steps = 0
    config.eval.val.every_steps = 300
  if arg in ("mnist", "cifar10", "folder"):
    config.data.name = arg
    config.data.image_size = 32  # MNIST's 28 px are resized to 32 so patches 8/4/2 tile it.
    config.data.flip = arg != "mnist"  # Digits are not mirror-symmetric.
  return config
