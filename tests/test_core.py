"""core/: errors, config helpers and the numpy preprocessing contract (checked against torch and PIL)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from usfm_edge.core.config import from_dict, load_yaml, merge, to_dict
from usfm_edge.core.errors import ConfigError, DataError, InputError, UsfmEdgeError
from usfm_edge.core.preprocess import PreprocessSpec, check_frame, preprocess, resize_gray


@dataclass
class _Cfg:
    lr: float = 1e-3
    epochs: int = 1
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    path: str | None = None


def test_config_unknown_key_suggests():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        from_dict(_Cfg, {"epoch": 3})


def test_config_types_coerced_and_checked(tmp_path):
    c = from_dict(_Cfg, {"lr": 1, "epochs": 2.0, "sizes": [3, 4]})
    assert c.lr == 1.0 and isinstance(c.lr, float) and c.epochs == 2 and c.sizes == (3, 4)
    with pytest.raises(ConfigError, match="expected int"):
        from_dict(_Cfg, {"epochs": "many"})
    (tmp_path / "c.yaml").write_text("lr: 0.5\nname: y\n")
    c = merge(_Cfg, load_yaml(tmp_path / "c.yaml"), {"name": "z", "epochs": None})
    assert (c.lr, c.name, c.epochs) == (0.5, "z", 1)
    assert to_dict(c)["sizes"] == [1, 2]
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(tmp_path / "bad.yaml")


def test_errors_carry_path_and_hint():
    e = DataError("truncated PNG", path="/x/y.png", hint="re-export the frame")
    assert str(e) == "/x/y.png: truncated PNG (hint: re-export the frame)"
    assert isinstance(e, UsfmEdgeError) and e.exit_code == 1
    import pickle

    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and type(e2) is DataError


def test_preprocess_matches_torch_bicubic(sample_frames):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    spec = PreprocessSpec()
    for frame in sample_frames:
        out = preprocess(frame, spec)
        assert out.shape == (3, 224, 224) and out.dtype == np.float32
        t = torch.from_numpy(frame.copy()).float()[None, None] / 255.0
        t = F.interpolate(t, size=(224, 224), mode="bicubic", align_corners=False).repeat(1, 3, 1, 1)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        ref = ((t - mean) / std)[0].numpy()
        assert np.abs(out - ref).max() < 5e-4  # fp32 summation order; = 0.03 grey levels


def test_antialias_matches_pil(sample_frames):
    from PIL import Image

    frame = sample_frames[0]
    ours = np.clip(np.round(resize_gray(frame, (224, 224), "bicubic", antialias=True)), 0, 255)
    pil = np.asarray(Image.fromarray(frame).resize((224, 224), Image.BICUBIC)).astype(np.float64)
    assert np.abs(ours - pil).max() <= 1.0  # PIL rounds in fixed point; at most one grey level apart


def test_check_frame_layouts(sample_frames):
    g = sample_frames[0]
    rgb = np.repeat(g[..., None], 3, axis=-1)
    assert np.array_equal(check_frame(rgb), g)
    assert np.array_equal(check_frame(np.moveaxis(rgb, -1, 0)), g)
    assert np.array_equal(check_frame(g[..., None]), g)
    nc = g[:, ::2]
    assert not nc.flags.c_contiguous and check_frame(nc).flags.c_contiguous
    for bad, msg in [(g.astype(np.float32), "dtype float32"), (g.astype(np.int16), "dtype int16"),
                     (g > 0, "dtype bool"), (np.zeros((1, 1), np.uint8), "1x1"),
                     (np.zeros((0, 5), np.uint8), "0x5"), (np.zeros((2, 3, 4, 5), np.uint8), "4 dimensions")]:
        with pytest.raises(InputError, match=msg):
            check_frame(bad)
    with pytest.raises(InputError, match="maximum side 100"):
        check_frame(g, PreprocessSpec(max_side=100))


def test_spec_roundtrip_and_validation():
    spec = PreprocessSpec(img_size=256, antialias=True)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError):
        PreprocessSpec(interpolation="nearest")
    with pytest.raises(ConfigError, match="unknown key"):
        PreprocessSpec.from_dict({"img_sz": 3})
