"""A site's TOML file: parsing, defaults, errors that name the key, node config."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.release_policy import SitePolicy
from client.site_config import DEFAULT_CLIENTAPP_PORT, SiteConfigError, load_site_config
from tests.site_files import site_toml

EXAMPLE = Path(__file__).resolve().parents[1] / "client" / "site.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "site.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_example_file_parses_with_paths_beside_it() -> None:
    config = load_site_config(EXAMPLE)
    assert config.name == "st-elsewhere"
    assert config.data.path == EXAMPLE.parent / "images"
    assert config.privacy.ledger == EXAMPLE.parent / "state" / "privacy-ledger.json"
    assert config.superlink.private_key == EXAMPLE.parent / "keys" / "supernode"


def test_values_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = _write(tmp_path, site_toml(data_path="../data/x.npz", data_format="medmnist")
                  .replace("clientapp_port = 19094\n", ""))
    config = load_site_config(path)
    assert config.data.path == tmp_path / "data" / "x.npz"
    assert config.data.format == "medmnist" and config.data.channels == 1
    assert (config.privacy.epsilon, config.privacy.delta, config.privacy.clip) == (1.0, 1e-5, 0.05)
    assert config.privacy.ledger == tmp_path / "conf" / "state" / "ledger.json"
    assert config.policy == SitePolicy()
    assert not config.policy.non_dp and config.policy.weights == "equal"
    assert config.superlink.trusted_entities is None
    assert config.device == "auto"
    assert config.superlink.clientapp_port == DEFAULT_CLIENTAPP_PORT
    assert config.superlink.ca_certificate == tmp_path / "conf" / "certs" / "ca.crt"
    assert config.source == path


@pytest.mark.parametrize("address", ["fl.example.org:9092", "10.0.0.5:443", "[2001:db8::1]:9092"])
def test_superlink_addresses_flower_accepts(tmp_path: Path, address: str) -> None:
    text = site_toml().replace('"127.0.0.1:9092"', f'"{address}"')
    assert load_site_config(_write(tmp_path, text)).superlink.address == address


def test_absolute_paths_stay(tmp_path: Path) -> None:
    config = load_site_config(_write(tmp_path, site_toml(data_path="/srv/images")))
    assert config.data.path == Path("/srv/images")


def test_node_config_has_the_keys_the_client_app_reads(tmp_path: Path) -> None:
    path = _write(tmp_path, site_toml(
        extra_top='device = "cpu"\n',
        releases='label_histograms = false\nnon_dp = ["train-loss", "timing"]\n'
                 'max_evaluations = 3\n')
        .replace('format = "imagefolder"', 'format = "dicom"\nchannels = 3'))
    node = load_site_config(path).node_config()
    assert node == {
        "site-name": "test-site", "data-path": str(tmp_path / "conf" / "images"),
        "data-format": "dicom", "channels": 3, "epsilon": 1.0, "delta": 1e-5, "clip": 0.05,
        "ledger-path": str(tmp_path / "conf" / "state" / "ledger.json"),
        "device": "cpu", "release-non-dp": "timing,train-loss", "aggregation-weights": "equal",
        "count-noise": 10.0, "max-evaluations": 3, "allow-shift-summaries": True,
        "allow-label-histograms": False, "composition": "sequential",
        "ledger-must-exist": False, "max-image-size": 512, "max-local-epochs": 10,
        "max-rounds": 100, "max-moment-layers": 16, "target-sensitivity": 0.0,
        "own-model-epochs": 10, "decide-with-mix": False,
    }
    # The ClientApp reads back the policy the file set.
    assert SitePolicy.from_node_config(node) == load_site_config(path).policy


@pytest.mark.parametrize(("change", "message"), [
    (("epsilon = 1.0", "epsilon = -1"), r"\[privacy\] epsilon = -1: expected a finite number > 0"),
    (("epsilon = 1.0", "epsilon = true"), r"\[privacy\] epsilon = True: expected .*not a boolean"),
    (("epsilon = 1.0", 'epsilon = "1"'), r"\[privacy\] epsilon = '1': expected a finite number"),
    (("epsilon = 1.0", "epsilon = inf"), r"\[privacy\] epsilon = inf"),
    (("epsilon = 1.0\n", ""), r"\[privacy\] epsilon is missing; add to \[privacy\] epsilon ="),
    (("delta = 1e-05", "delta = 1.5"), r"\[privacy\] delta = 1.5: expected a number in \(0, 1\)"),
    (("clip = 0.05", "clip = 0"), r"\[privacy\] clip = 0: expected a finite number > 0"),
    (("epsilon = 1.0", "epsilon = 1.0\nepsilion = 2.0"),
     r"unknown setting\(s\) epsilion in \[privacy\]; known there: clip, delta, epsilon, ledger"),
    (('format = "imagefolder"', 'format = "nifti"'),
     r"\[data\] format = 'nifti': must be one of medmnist, imagefolder, dicom"),
    (('format = "imagefolder"', 'format = "imagefolder"\nchannels = 2'),
     r"\[data\] channels = 2: expected 1 \(grey\) or 3 \(RGB\)"),
    (('path = "images"', 'path = ""'), r"\[data\] path = '': must not be empty"),
    (('address = "127.0.0.1:9092"', 'address = "https://fl.example.org:9092"'),
     r"\[superlink\] address = 'https://fl.example.org:9092': expected host:port without"),
    (('address = "127.0.0.1:9092"', 'address = "fl.example.org"'), r"\[superlink\] address"),
    (("clientapp_port = 19094", "clientapp_port = 70000"),
     r"\[superlink\] clientapp_port = 70000: expected a port number"),
    (('name = "test-site"', 'name = "st marys/icu"'), r"name = 'st marys/icu': use 1 to 64"),
    (("[releases]\n", '[releases]\nshift_summaries = "no"\n'),
     r"\[releases\] shift_summaries = 'no': expected true or false"),
    (("[releases]\n", '[releases]\nnon_dp = ["everything"]\n'),
     r"\[releases\] non_dp .*unknown release"),
    (("[releases]\n", '[releases]\ncomposition = "parallel"\n'),
     r"\[releases\] composition .*must be one of sequential, parallel-parts"),
    (("[releases]\n", '[releases]\n[limits]\nmax_rounds = 0\n'),
     r"\[limits\] max_rounds = 0: expected a whole number >= 1"),
    (("[releases]\n", '[releases]\n[operating_point]\ntarget_sensitivity = 95\n'),
     r"\[operating_point\] target_sensitivity = 95.*a sensitivity in \(0, 1\), e.g. 0.9"),
    (('name = "test-site"', 'name = "x"\ndevice = "tpu"'),
     r"device = 'tpu': must be one of auto, cpu, cuda"),
    (('name = "test-site"', 'name = "x"\ngpu = 1'), r"unknown setting\(s\) gpu in the top level"),
    (("[superlink]", "[superlinks]"), r"table \[superlink\] is missing"),
])
def test_errors_name_the_key_the_value_and_the_fix(tmp_path: Path, change: tuple[str, str],
                                                   message: str) -> None:
    text = site_toml()
    assert change[0] in text
    with pytest.raises(SiteConfigError, match=message) as raised:
        load_site_config(_write(tmp_path, text.replace(change[0], change[1], 1)))
    assert str(tmp_path / "conf" / "site.toml") in str(raised.value)


def test_a_target_sensitivity_sets_the_sites_operating_point(tmp_path: Path) -> None:
    text = site_toml().replace("[releases]\n", "[releases]\n[operating_point]\n"
                                                "target_sensitivity = 0.9\n", 1)
    config = load_site_config(_write(tmp_path, text))
    assert config.policy.target_sensitivity == 0.9
    assert SitePolicy.from_node_config(config.node_config()).target_sensitivity == 0.9


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match=r"cannot read the site config .*nope\.toml"):
        load_site_config(tmp_path / "nope.toml")
    with pytest.raises(SiteConfigError, match="is not valid TOML"):
        load_site_config(_write(tmp_path, "name = \n"))
