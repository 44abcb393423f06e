"""Data sources and pipeline on the real shared data (MNIST test set, CIFAR-10 test JPEGs)."""
import pathlib
import time

try:  # diffusers (it loads libtriton) must come before TensorFlow: the other order segfaults.
  import diffusers  # pylint: disable=g-import-not-at-top
except ImportError:
  diffusers = None
import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from dit_jax.data import datasets
from dit_jax.data import images
from dit_jax.data import latent_format
from dit_jax.data import pipeline
from dit_jax.data import sources
from dit_jax.models import vae as vae_lib
from tests.helpers import load_tool

REPO = pathlib.Path(__file__).resolve().parents[1]
# Published facts about these files (shared/data/README.md).
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_TEST_MEAN = [125.99, 123.69, 114.85]
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


def _cfg(**kw):
  cfg = sources.default_data_config()
  cfg.update(kw)
  return cfg


def _mesh_sharding(shape=(4, 2)):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:np.prod(shape)]).reshape(shape),
                           ("data", "fsdp"))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


@pytest.fixture(scope="module")
def cifar(shared_data):
  return sources.create_source(_cfg(name="cifar10", path=str(shared_data / "cifar10_test_jpg"),
                                 split="test", image_size=32))


def _adm_reference_crop(pil_image, image_size):
  """guided-diffusion image_datasets.center_crop_arr, step by step, written out independently."""
  w, h = pil_image.size
  im = pil_image
  while min(w, h) >= 2 * image_size:
    w, h = w // 2, h // 2
    im = im.resize((w, h), Image.BOX)
  s = image_size / min(w, h)
  w, h = round(w * s), round(h * s)
  im = im.resize((w, h), Image.BICUBIC)
  y0, x0 = (h - image_size) // 2, (w - image_size) // 2
  return np.array(im)[y0:y0 + image_size, x0:x0 + image_size]


@pytest.mark.parametrize("size,src_wh", [(64, (300, 200)), (32, (32, 32)), (24, (517, 1031)),
                                         (100, (130, 90))])
def test_adm_center_crop_matches_reference(shared_data, size, src_wh):
  with Image.open(shared_data / "cifar10_test_jpg/test/horse/0007.jpg") as im:
    im = im.convert("RGB").resize(src_wh, Image.BICUBIC)  # a real photo at an awkward size
  ours = images.center_crop_arr(im, size)
  assert ours.shape == (size, size, 3)
  np.testing.assert_array_equal(ours, _adm_reference_crop(im, size))


def test_digits_default_is_offline_and_resized():
  cfg = sources.default_data_config()
  assert cfg.name == "digits"
  src = sources.create_source(cfg)
  raw, labels = datasets.read_digits()
  assert (src.num_examples, src.num_classes, src.image_shape) == (1797, 10, (16, 16, 1))
  assert src.class_names == tuple("0123456789")
  x, y = src.read(np.arange(5), np.zeros(5, bool))
  np.testing.assert_array_equal(y, labels[:5])
  ref = images.center_crop_arr(Image.fromarray(raw[3, ..., 0]), 16)  # 8 -> 16 BICUBIC upsample
  np.testing.assert_array_equal(x[3, ..., 0], ref)


def test_mnist_from_shared_files(shared_data):
  src = sources.create_source(_cfg(name="mnist", path=str(shared_data / "mnist"), split="test",
                                image_size=28, flip=False))
  assert (src.num_examples, src.image_shape, src.num_classes) == (10000, (28, 28, 1), 10)
  np.testing.assert_array_equal(np.bincount(src.labels), MNIST_TEST_COUNTS)
  np.testing.assert_array_equal(src.labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
  assert abs(src.images.mean() - 33.79) < 0.01
  pipe = pipeline.Pipeline(src, 50, seed=0)
  b = pipe.batch(0)
  idx, _ = pipe.indices(0)
  np.testing.assert_allclose(np.asarray(b["image"]), src.images[idx] / 127.5 - 1, atol=1e-6)
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):  # not in shared data
    sources.create_source(_cfg(name="mnist", path=str(shared_data / "mnist"), split="train"))


def test_cifar10_folder_from_shared_jpegs(cifar):
  assert (cifar.num_examples, cifar.image_shape, cifar.num_classes) == (10000, (32, 32, 3), 10)
  assert cifar.class_names == CIFAR_CLASSES
  np.testing.assert_array_equal(np.bincount(cifar.labels), [1000] * 10)
  np.testing.assert_allclose(cifar.images.reshape(-1, 3).mean(0), CIFAR_TEST_MEAN, atol=0.01)


def test_npz_source_roundtrip(shared_data, tmp_path):
  images, labels = datasets.read_mnist(shared_data / "mnist", "t10k")
  datasets.write_npz(tmp_path / "m.npz", images[:200, ..., 0], labels[:200])
  src = sources.create_source(_cfg(name="npz", path=str(tmp_path / "m.npz"), image_size=28))
  np.testing.assert_array_equal(src.images, images[:200])
  np.testing.assert_array_equal(src.labels, labels[:200])
  rgb = sources.create_source(_cfg(name="npz", path=str(tmp_path / "m.npz"), image_size=28,
                                channels=3))
  assert rgb.image_shape == (28, 28, 3)
  np.testing.assert_array_equal(rgb.images[..., 1], images[:200, ..., 0])


def test_batches_are_a_function_of_seed_and_step(cifar):
  """Same (seed, step) -> same batch on any device layout; epochs are permutations; flips mirror."""
  small = sources.ArraySource(**{**cifar.__dict__, "num_examples": 96, "images": cifar.images[:96],
                              "labels": cifar.labels[:96]})
  a = pipeline.Pipeline(small, 32, seed=7, sharding=_mesh_sharding())
  b = pipeline.Pipeline(small, 32, seed=7)  # one device
  c = pipeline.Pipeline(small, 32, seed=8, sharding=_mesh_sharding())
  batch_a, batch_b = a.batch(4), b.batch(4)
  assert batch_a["image"].sharding == _mesh_sharding()
  np.testing.assert_array_equal(np.asarray(batch_a["image"]), np.asarray(batch_b["image"]))
  np.testing.assert_array_equal(np.asarray(batch_a["label"]), np.asarray(batch_b["label"]))
  assert not np.array_equal(a.indices(4)[0], c.indices(4)[0])
  # A "resumed" pipeline (fresh object, starts at step 4) continues identically.
  resumed = next(pipeline.Pipeline(small, 32, seed=7, sharding=_mesh_sharding()).iterate(4))
  np.testing.assert_array_equal(np.asarray(resumed["image"]), np.asarray(batch_a["image"]))
  # Each epoch (3 steps) visits every example once, in a new order.
  epoch0 = np.concatenate([a.indices(s)[0] for s in range(3)])
  epoch1 = np.concatenate([a.indices(s)[0] for s in range(3, 6)])
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(96))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(96))
  assert not np.array_equal(epoch0, epoch1)
  # Flipped rows are the mirrored source images.
  idx, flips = a.indices(4)
  assert 0 < flips.sum() < 32
  img = (np.asarray(batch_a["image"]) + 1) * 127.5
  np.testing.assert_allclose(img[flips], small.images[idx[flips]][:, :, ::-1], atol=1e-3)
  np.testing.assert_allclose(img[~flips], small.images[idx[~flips]], atol=1e-3)


def test_process_rows_are_slices_of_the_global_batch(cifar):
  """A process that owns rows [8, 24) reads exactly those rows of the global order."""
  pipe = pipeline.Pipeline(cifar, 32, seed=3)
  full_idx, full_flips = pipe.indices(11)
  pipe.local_start, pipe.local_stop = 8, 24  # what a 4-process job's second process computes
  idx, flips = pipe.indices(11)
  np.testing.assert_array_equal(idx, full_idx[8:24])
  np.testing.assert_array_equal(flips, full_flips[8:24])
  x, _ = pipe.host_batch(11)
  assert x.shape == (16, 32, 32, 3)


def test_clear_errors_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="unknown data.name"):
    sources.create_source(_cfg(name="imagenet"))
  with pytest.raises(ValueError, match="needs data.path"):
    sources.create_source(_cfg(name="folder"))
  with pytest.raises(ValueError, match="does not exist"):
    sources.create_source(_cfg(name="npz", path=str(tmp_path / "nope.npz")))
  for bad in (0, -3, "32", 2.5):
    with pytest.raises(ValueError, match="image_size"):
      sources.create_source(_cfg_unlocked(image_size=bad))
  with pytest.raises(ValueError, match="channels"):
    sources.create_source(_cfg(channels=2))
  with pytest.raises(ValueError, match="tfds_name"):
    sources.create_source(_cfg(name="tfds"))
  src = sources.create_source(_cfg(max_examples=64))
  with pytest.raises(ValueError, match="does not split evenly"):
    pipeline.Pipeline(src, 12, seed=0, sharding=_mesh_sharding())


def _cfg_unlocked(**kw):
  cfg = sources.default_data_config()
  with cfg.ignore_type():
    cfg.update(kw)
  return cfg


def test_tfds_offline_fails_fast(tmp_path, monkeypatch):
  """No prepared data + unreachable host -> DataUnavailableError in seconds, no download attempt."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sources, "TFDS_PROBE_HOST", ("192.0.2.1", 443))  # TEST-NET-1: never routable

  def no_download(*args, **kwargs):
    raise AssertionError("download_and_prepare must not run when offline")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
  cfg = _cfg(name="mnist", tfds_data_dir=str(tmp_path), tfds_probe_timeout_s=0.5)
  t0 = time.monotonic()
  with pytest.raises(sources.DataUnavailableError, match="unreachable"):
    sources.create_source(cfg)
  assert time.monotonic() - t0 < 60  # generous guard; unguarded tfds.load retries ~200 s
  with pytest.raises(ValueError, match="unknown TFDS dataset"):
    sources.create_source(_cfg(name="tfds", tfds_name="no_such_dataset_xyz",
                            tfds_data_dir=str(tmp_path)))


@pytest.mark.slow
def test_tfds_prepared_dataset_reads_real_mnist(shared_data, tmp_path):
  """A TFDS dataset prepared locally from the shared MNIST files loads through data.name='tfds'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  images, labels = datasets.read_mnist(shared_data / "mnist", "t10k")
  images, labels = images[:64], labels[:64]

  class DitJaxTestMnist(tfds.core.GeneratorBasedBuilder):
    """64 MNIST test digits (registered under the name dit_jax_test_mnist)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                                   features=tfds.features.FeaturesDict({
                                       "image": tfds.features.Image(shape=(28, 28, 1)),
                                       "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i in range(len(images)):
        yield i, {"image": images[i], "label": labels[i]}

  for fmt in ("tfrecord", "array_record"):
    d = tmp_path / fmt
    tfds.builder("dit_jax_test_mnist", data_dir=str(d), file_format=fmt).download_and_prepare()
    for gb in (8.0, 0.0) if fmt == "array_record" else (8.0,):  # in RAM, then lazy reads
      src = sources.create_source(_cfg(name="tfds", tfds_name="dit_jax_test_mnist", split="test",
                                    tfds_data_dir=str(d), image_size=28, max_in_memory_gb=gb))
      assert (src.num_examples, src.num_classes, src.image_shape) == (64, 10, (28, 28, 1))
      x, y = src.read(np.arange(64), np.zeros(64, bool))
      # TFDS stores records in a hashed order: compare as sets of (image, label).
      ours = sorted((im.tobytes(), int(l)) for im, l in zip(x, y))
      ref = sorted((im.tobytes(), int(l)) for im, l in zip(images, labels))
      assert ours == ref, (fmt, gb)


def test_latent_extraction_resume_and_source(shared_data, tmp_path):
  """Encode 20 CIFAR images with a small VAE; resume; read back as the latents source."""
  cfg = vae_lib.VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
  model = vae_lib.AutoencoderKL(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  rng = np.random.default_rng(0)  # host-side random weights: compiling model.init is slow on CPU

  def random_param(path, s):
    if path[-1].key == "kernel":
      return rng.normal(size=s.shape).astype(np.float32) / np.sqrt(np.prod(s.shape[:-1]))
    return (path[-1].key == "scale") + 0.1 * rng.normal(size=s.shape).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(random_param, nn.unbox(shapes)["params"])
  encode = jax.jit(lambda x: model.apply({"params": params}, x, method=model.encode))
  calls = []

  def encode_fn(x):
    calls.append(len(x))
    return encode(x)

  src = sources.create_source(_cfg(name="cifar10", path=str(shared_data / "cifar10_test_jpg"), split="test",
                                image_size=16, max_examples=20, flip=False))
  out = tmp_path / "lat"
  kw = dict(shard_size=8, batch_size=4, meta_extra={"scaling_factor": 0.18215}, progress=False)
  meta = latent_format.write_latents(src, encode_fn, out, **kw)
  # shards of 8, 8, 4 examples in chunks of 4 -> 5 chunks, each encoded plain and mirrored.
  assert meta["num_shards"] == 3 and set(calls) == {4} and len(calls) == 10
  first = np.load(out / latent_format.shard_names(1, 3)[0])
  (out / latent_format.shard_names(1, 3)[0]).unlink()
  calls.clear()
  latent_format.write_latents(src, encode_fn, out, **kw)  # resumes: only shard 1 (8 images x 2)
  assert len(calls) == 2 * 2
  np.testing.assert_array_equal(np.load(out / latent_format.shard_names(1, 3)[0]), first)
  with pytest.raises(ValueError, match="another extraction"):
    latent_format.write_latents(src, encode_fn, out, **{**kw, "shard_size": 10})
  # Stored variants are the encodings of the image and of its mirror image.
  x, _ = src.read(np.arange(8, 12), np.zeros(4, bool))
  xf = x.astype(np.float32) / 127.5 - 1
  for v, xv in enumerate((xf, xf[:, :, ::-1])):
    mean, logvar = encode(xv)
    np.testing.assert_allclose(first[:4, v], np.concatenate([mean, logvar], -1), atol=1e-5)

  lat = sources.create_source(_cfg(name="latents", path=str(out), image_size=16, flip=True))
  assert (lat.num_examples, lat.image_shape, lat.kind) == (20, (8, 8, 4), "latents")
  assert lat.class_names == CIFAR_CLASSES
  pipe = pipeline.Pipeline(lat, 8, seed=5, sharding=_mesh_sharding())
  batch = pipe.batch(2)
  idx, flips = pipe.indices(2)
  moments, labels = lat.read(idx, flips)
  np.testing.assert_array_equal(np.asarray(batch["label"]), src.labels[idx])
  eps = jax.random.normal(jax.random.fold_in(jax.random.key(5), 2), (8, 8, 8, 4))
  mean, logvar = moments[..., :4], moments[..., 4:]
  np.testing.assert_allclose(np.asarray(batch["image"]),
                             (mean + np.exp(0.5 * logvar) * eps) * 0.18215, rtol=1e-5, atol=1e-6)
  single = pipeline.Pipeline(lat, 8, seed=5).batch(2)  # same numbers on one device
  np.testing.assert_allclose(np.asarray(single["image"]), np.asarray(batch["image"]), atol=1e-6)
  with pytest.raises(ValueError, match="extracted at 16px"):
    sources.create_source(_cfg(name="latents", path=str(out), image_size=32))
  (out / latent_format.shard_names(2, 3)[1]).unlink()
  with pytest.raises(ValueError, match="1 of 3 shards missing"):
    sources.create_source(_cfg(name="latents", path=str(out), image_size=0))


def test_extract_latents_tool_end_to_end(shared_data, tmp_path):
  """The tool with a diffusers save_pretrained VAE folder; without weights it says where to put them."""
  torch = pytest.importorskip("torch")
  if diffusers is None:
    pytest.skip("diffusers not installed")
  tool = load_tool("extract_latents")
  cfg = _cfg(name="cifar10", path=str(shared_data / "cifar10_test_jpg"), split="test",
             image_size=16, max_examples=16)
  with pytest.raises(FileNotFoundError, match="huggingface-cli download stabilityai/sd-vae-ft-ema"):
    tool.run(cfg, tmp_path / "no_vae", tmp_path / "out", batch_size=8, shard_size=8)
  torch.manual_seed(0)
  diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8
                          ).save_pretrained(tmp_path / "vae")
  with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor"):
    tool.run(_cfg(**{**cfg.to_dict(), "image_size": 15}), tmp_path / "vae", tmp_path / "out", 8, 8)
  meta = tool.run(cfg, tmp_path / "vae", tmp_path / "out", batch_size=8, shard_size=8,
                  progress=False)
  assert meta["num_shards"] == 2 and meta["scaling_factor"] == 0.18215 and meta["flips"] == 2
  lat = sources.create_source(_cfg(name="latents", path=str(tmp_path / "out"), image_size=0))
  batch = pipeline.Pipeline(lat, 8, seed=0, sharding=_mesh_sharding()).batch(0)
  assert batch["image"].shape == (8, 8, 8, 4) and np.isfinite(np.asarray(batch["image"])).all()


def test_bad_npz_files_name_the_file_and_the_fault(tmp_path):
  good = tmp_path / "good.npz"
  rng = np.random.default_rng(0)
  datasets.write_npz(good, rng.integers(0, 256, (40, 8, 8), np.uint8), np.arange(40) % 4)
  cases = {}
  (tmp_path / "corrupt.npz").write_bytes(rng.integers(0, 256, 4000, np.uint8).tobytes())
  cases["corrupt.npz"] = "not a readable .npz"
  (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  cases["truncated.npz"] = "not a readable .npz"
  np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, int))
  cases["empty.npz"] = "holds no examples"
  np.savez(tmp_path / "none.npz")
  cases["none.npz"] = "expected an array named 'images'"
  images = rng.integers(0, 256, (10, 8, 8), np.uint8)
  np.savez(tmp_path / "negative.npz", images=images, labels=np.arange(10) - 1)
  cases["negative.npz"] = "class indices >= 0, got a minimum of -1"
  np.savez(tmp_path / "float.npz", images=images, labels=np.linspace(0, 2, 10))
  cases["float.npz"] = "must be integers"
  np.savez(tmp_path / "pickled.npz", images=images, labels=np.array([{"a": 1}] * 10, object))
  cases["pickled.npz"] = "not a readable .npz of arrays"
  for name, msg in cases.items():
    with pytest.raises(ValueError, match=msg) as e:
      sources.create_source(_cfg(name="npz", path=str(tmp_path / name), image_size=8))
    assert name in str(e.value), str(e.value)
  assert sources.create_source(_cfg(name="npz", path=str(good), image_size=8)).num_examples == 40
