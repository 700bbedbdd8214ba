"""FLUX autoencoder: exact FLUX key table, shapes, latent scaling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unibrain_cli.config.components import VAEConfig
from unibrain_cli.model.vae import AutoEncoder

FIXTURE = Path(__file__).parent / "fixtures" / "flux-ae-keys.tsv"
TINY = VAEConfig(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4,
                 scale_factor=0.5, shift_factor=0.25)
FLUX = VAEConfig(in_channels=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16,
                 scale_factor=0.3611, shift_factor=0.1159, resolution=256)


def _flux_rows() -> dict[str, tuple[int, ...]]:
    rows = {}
    for line in FIXTURE.read_text().splitlines()[1:]:
        if not line or line.startswith("#"):
            continue
        name, shape, _ = line.split("\t")
        rows[name] = tuple(int(s) for s in shape.strip("[]").split(","))
    return rows


def test_flux_config_matches_flux_key_table_exactly() -> None:
    rows = _flux_rows()
    assert len(rows) == 244
    with torch.device("meta"):
        model = AutoEncoder(FLUX)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(rows) - set(ours)) == []  # missing
    assert sorted(set(ours) - set(rows)) == []  # extra
    assert ours == rows
    assert sum(v.numel() for v in model.parameters()) == 83_819_683
    assert model.downsample == 8


def test_tiny_shapes_round_trip() -> None:
    torch.manual_seed(0)
    vae = AutoEncoder(TINY).eval()
    x = torch.rand(2, 1, 16, 12) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        mean, logvar = vae.encode_moments(x)
        x_hat = vae.decode(z)
    assert vae.downsample == 2
    assert z.shape == (2, 4, 8, 6) and mean.shape == logvar.shape == z.shape
    assert x_hat.shape == x.shape
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 1, 15, 12))


def test_scale_shift_convention_and_inverse() -> None:
    torch.manual_seed(0)
    vae = AutoEncoder(TINY).eval()
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        mean, _ = vae.encode_moments(x)
        z = vae.encode(x)
        torch.testing.assert_close(z, 0.5 * (mean - 0.25))
        # decode undoes the scaling: decoder(raw) == decode(scaled)
        torch.testing.assert_close(vae.decode(z), vae.decoder(mean))


def test_sampling_is_seeded_and_noisy() -> None:
    torch.manual_seed(0)
    vae = AutoEncoder(TINY).eval()
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        m = vae.encode(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, m)


def test_group_norm_groups_for_narrow_widths() -> None:
    vae = AutoEncoder(VAEConfig(in_channels=1, ch=24, ch_mult=(1, 2), num_res_blocks=1, z_channels=4))
    groups = {m.num_groups for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {24}  # 24 channels -> 24 groups, 48 channels -> 24 (largest divisor <= 32)
