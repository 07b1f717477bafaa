"""FID: the Frechet distance and the Inception features against pytorch-fid, and the commands.

pytorch-fid 0.3.0 is vendored in tests/third_party with a stand-in for the part of torchvision
it uses (torchvision's registry wheels do not import beside torch 2.13.0; see the README there).
"""

import contextlib
import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from helpers import REPO, run_cli_json  # pylint: disable=g-bad-import-order
from imagen_jax.eval import fid
from imagen_jax.eval import inception

torch = pytest.importorskip("torch")

THIRD_PARTY = os.path.join(REPO, "tests", "third_party")


@contextlib.contextmanager
def pytorch_fid():
  """pytorch-fid's `inception` and `fid_score` modules, imported from tests/third_party.

  The modules (and the torchvision stand-in) leave sys.modules afterwards, so that nothing
  else in this process (transformers looks for torchvision) sees them.
  """
  names = lambda: [n for n in sys.modules if n.split(".")[0] in ("pytorch_fid", "torchvision")]
  saved = {n: sys.modules.pop(n) for n in names()}
  sys.path.insert(0, THIRD_PARTY)
  try:
    from pytorch_fid import fid_score as fid_score_module  # pylint: disable=g-import-not-at-top
    from pytorch_fid import inception as inception_module  # pylint: disable=g-import-not-at-top
    yield inception_module, fid_score_module
  finally:
    sys.path.remove(THIRD_PARTY)
    for n in names():
      del sys.modules[n]
    sys.modules.update(saved)


def random_state_dict(reference_inception, seed=0):
  """Random tensors with the names and shapes of pytorch-fid's weight file, scaled so that
  activations stay O(1) through the 94 conv layers (He-scaled convs, BatchNorm near identity)."""
  net = reference_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  generator = torch.Generator().manual_seed(seed)
  state = {}
  for name, tensor in net.state_dict().items():
    if name.endswith("num_batches_tracked"):
      state[name] = torch.zeros_like(tensor)
    elif name.endswith("conv.weight") or name == "fc.weight":
      fan_in = int(np.prod(tensor.shape[1:]))
      state[name] = torch.randn(tensor.shape, generator=generator) * np.sqrt(2.0 / fan_in)
    elif name.endswith(("bn.weight", "running_var")):
      state[name] = 0.5 + torch.rand(tensor.shape, generator=generator)
    else:
      state[name] = 0.1 * torch.randn(tensor.shape, generator=generator)
  return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(random FID-layout state_dict, .pth path, .npz path, pytorch-fid's InceptionV3 on it)."""
  directory = tmp_path_factory.mktemp("inception")
  with pytorch_fid() as (reference_inception, _):
    state = random_state_dict(reference_inception)
    # fid_inception_v3() "downloads" the weights: give it ours.
    reference_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    reference = reference_inception.InceptionV3([3]).eval()
  pth = str(directory / inception.FID_WEIGHTS_FILE)
  torch.save(state, pth)
  npz = str(directory / "fid_inception.npz")
  inception.pth_to_npz(pth, npz)
  return state, pth, npz, reference


def random_statistics(rng, dim, n):
  a = rng.normal(size=(n, dim))
  b = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + rng.normal(size=dim)
  return fid.statistics(a) + fid.statistics(b)


def scipy_reference(mu1, sigma1, mu2, sigma2):
  """Independent of both: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), both roots by sqrtm."""
  root1 = linalg.sqrtm(sigma1)
  tr_covmean = np.trace(linalg.sqrtm(root1 @ sigma2 @ root1)).real
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean


@pytest.mark.parametrize("dim,n,seed", [(16, 100, 0), (64, 256, 1), (128, 512, 2),
                                        (64, 32, 3)])  # the last: singular covariances
def test_frechet_distance_matches_pytorch_fid_and_scipy(dim, n, seed):
  mu1, sigma1, mu2, sigma2 = random_statistics(np.random.default_rng(seed), dim, n)
  ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
  with pytorch_fid() as (_, fid_score):
    theirs = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
  assert ours == pytest.approx(theirs, rel=1e-6)
  if n > dim:  # scipy's sqrtm of a singular matrix is inaccurate (why pytorch-fid adds eps)
    assert ours == pytest.approx(scipy_reference(mu1, sigma1, mu2, sigma2), rel=1e-6)
  assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(ours, rel=1e-7)


def test_frechet_distance_is_zero_for_identical_statistics():
  mu, sigma, _, _ = random_statistics(np.random.default_rng(0), 64, 256)
  assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
  mu, sigma, _, _ = random_statistics(np.random.default_rng(0), 64, 16)  # rank 15
  assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
  with pytest.raises(ValueError, match="do not match"):
    fid.frechet_distance(mu, sigma, mu[:8], sigma[:8, :8])


def test_statistics_round_trip_and_read_pytorch_fid_files(tmp_path):
  features = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
  mu, sigma = fid.statistics(features)
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False))
  fid.save_statistics(str(tmp_path / "s.npz"), mu, sigma, source="shapes", image_size=64)
  mu2, sigma2, metadata = fid.load_statistics(str(tmp_path / "s.npz"))
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  assert metadata == {"source": "shapes", "image_size": 64}
  np.savez(tmp_path / "theirs.npz", mu=mu, sigma=sigma)  # pytorch-fid's --save-stats format
  assert fid.load_statistics(str(tmp_path / "theirs.npz"))[2] == {}


def test_resize_matches_torch_bilinear():
  rng = np.random.default_rng(0)
  # Growing (samples are smaller than 299) and shrinking (no antialiasing, like torch's).
  for shape in ((2, 40, 40, 3), (1, 640, 512, 3), (1, 299, 299, 3)):
    images = rng.random(shape, np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2),
                                           size=(299, 299), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(np.asarray(inception.resize_bilinear(images, 299)),
                               want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


@pytest.mark.slow
def test_features_match_pytorch_fid_inception(weights):
  state, pth, npz, reference = weights
  from_pth = inception.load_weights(pth)
  from_npz = inception.load_weights(npz)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, from_npz)
  assert len(state) == 566  # 94 conv layers x (weight, 4 BatchNorm tensors, step count) + fc
  extractor = inception.FeatureExtractor(from_npz, batch_size=4)
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  features = extractor(images)
  assert features.shape == (3, inception.FEATURES) and features.dtype == np.float32
  with torch.no_grad():
    want = reference(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0]
  want = want[:, :, 0, 0].numpy()
  assert np.abs(want).mean() > 0.1  # the random network is not degenerate
  np.testing.assert_allclose(features, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  np.testing.assert_array_equal(extractor.features_of(iter(images)), features)


def test_weight_errors_list_every_mismatch(weights):
  state = {k: v.numpy() for k, v in weights[0].items()}
  broken = dict(state)
  del broken["Mixed_6b.branch7x7_2.conv.weight"]
  broken["Mixed_7c.branch_pool.bn.bias"] = np.zeros(7, np.float32)
  broken["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  with pytest.raises(inception.WeightsError) as error:
    inception.variables_from_state_dict(broken)
  message = str(error.value)
  assert "1 missing: Mixed_6b.branch7x7_2.conv.weight [128, 128, 1, 7]" in message
  assert "1 unexpected: AuxLogits.fc.weight" in message and "torchvision's ImageNet" in message
  assert "Mixed_7c.branch_pool.bn.bias: got [7], expected [192]" in message
  imagenet = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(inception.WeightsError, match="1008"):
    inception.variables_from_state_dict(imagenet)
  with pytest.raises(FileNotFoundError, match="nothing downloads"):
    inception.load_weights("/nonexistent/" + inception.FID_WEIGHTS_FILE)


@pytest.mark.slow
def test_fid_stats_and_fid_commands(tmp_path, weights, shapes_data_dir):
  npz = weights[2]
  stats = str(tmp_path / "shapes.npz")
  common = [f"--inception_weights={npz}", "--inception_batch_size=8"]
  made = run_cli_json("eval", "--metric=fid-stats", "--source=shapes",
                      f"--data_dir={shapes_data_dir}", "--split=validation", "--num_images=12",
                      "--image_size=64", "--seed=3", f"--output={stats}", *common, timeout=300)
  assert made["num_images"] == 12 and made["image_size"] == 64
  # The same 12 images, shuffled and written as samples: the FID is 0.
  _, images = fid.source_images("shapes", "validation", 64, data_dir=shapes_data_dir,
                                num_images=12, seed=3)
  images = list(images)
  samples = tmp_path / "samples"
  samples.mkdir()
  order = np.random.default_rng(0).permutation(12)
  records = []
  for i, k in enumerate(order):
    Image.fromarray(images[k]).save(samples / f"{i:05d}.png")
    records.append({"file": f"{i:05d}.png", "prompt": "", "index": i})
  (samples / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  scores = run_cli_json("eval", "--metric=fid", f"--samples={samples}", f"--reference={stats}",
                        *common, timeout=300)
  assert scores["fid"] == pytest.approx(0, abs=1e-6)
  assert scores["num_samples"] == 12 and scores["reference_source"] == "shapes"
  # Against other images, the FID is the distance between the two sets' statistics.
  extractor = inception.FeatureExtractor(inception.load_weights(npz), batch_size=8)
  mu, sigma, _ = fid.load_statistics(stats)
  want_mu, want_sigma = fid.statistics(extractor(np.stack(images)))
  np.testing.assert_allclose(mu, want_mu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sigma, want_sigma, rtol=1e-4, atol=1e-5)
  for i in range(6):  # half of the samples become noise
    noise = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(samples / f"{i:05d}.png")
  scores = fid.compute_fid(str(samples), stats, extractor)
  shifted = extractor(np.stack([np.asarray(Image.open(samples / r["file"])) for r in records]))
  assert scores["fid"] == pytest.approx(
      fid.frechet_distance(*fid.statistics(shifted), mu, sigma), rel=1e-6)
  assert scores["fid"] > 1.0
