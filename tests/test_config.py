"""Strict typed configs: YAML layers, dotted overrides, one-line errors naming file and key."""

import ast
import textwrap

import pytest

from conftest import REPO, run_cli
from trainer import models
from trainer.config import Config, ConfigError, from_yaml, load_config, save_config, to_yaml


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = _write(tmp_path, "run.yaml", """
        model:
          arch: resnet9
        optim:
          lr: 5e-4          # PyYAML alone reads this as the string '5e-4'
          weight_decay: 1E-5
        data:
          batch_size: 128
    """)
    cfg = load_config(path, ["optim.warmup_epochs=3", "logging.tags=[a, b]", "train.compile=false", "train.ema=0"])
    assert cfg.model.arch == "resnet9"
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 1e-5
    assert cfg.optim.warmup_epochs == 3.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.data.batch_size == 128 and cfg.data.num_workers == 4  # a default kept
    assert cfg.logging.tags == ["a", "b"]
    assert cfg.train.compile is False and cfg.train.ema == 0.0


def test_extends_lays_files_over_each_other(tmp_path):
    _write(tmp_path, "base.yaml", """
        optim: {lr: 0.2, momentum: 0.8}
        train: {epochs: 30}
    """)
    path = _write(tmp_path, "arch.yaml", """
        extends: base.yaml
        model: {arch: mobilenet}
        optim: {lr: 0.05}
    """)
    cfg = load_config(path, ["train.epochs=5"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs) == (0.05, 0.8, 5)


@pytest.mark.parametrize(
    "text, overrides, fragments",
    [
        ("model: {arch: resnet9}\noptim: {lrr: 0.1}\n", [], ["run.yaml", "unknown key 'optim.lrr'", "'optim.lr'"]),
        ("model: {arch: resnet9}\nmodel: {arch: vgg_bn}\n", [], ["run.yaml", "line 2", "duplicate key 'model'"]),
        ("model:\n  arch: resnet9\n  arch: vgg_bn\n", [], ["run.yaml", "duplicate key 'arch'"]),
        ("model: {arch: resnet9}\noptim: {lr: fast}\n", [], ["run.yaml", "optim.lr", "expected a number", "'fast'"]),
        ("model: {arch: resnet9}\ndata: {batch_size: 12.5}\n", [], ["run.yaml", "data.batch_size", "integer"]),
        ("model: {arch: resnet9}\ndata: {dtype: float64}\n", [], ["data.dtype", "'bfloat16'"]),
        ("model: {arch: resnet9}\ntrain: {amp: 1}\n", [], ["train.amp", "true/false"]),
        ("optim: {lr: 0.1}\n", [], ["run.yaml", "model.arch: required value missing"]),
        ("model: {arch: resnet99}\n", [], ["model.arch", "unknown architecture 'resnet99'", "resnet9"]),
        ("model: {arch: resnet9}\n", ["optim.lrr=0.1"], ["override 'optim.lrr=0.1'", "did you mean 'optim.lr'"]),
        ("model: {arch: resnet9}\n", ["optim.lr=abc"], ["override 'optim.lr=abc'", "expected a number"]),
        ("model: {arch: resnet9}\n", ["optim.lr"], ["override 'optim.lr'", "key=value"]),
        ("model: {arch: resnet9}\n", ["data.batch_size=-4"], ["data.batch_size", "must be positive"]),
        # #22: a cutout larger than the image hung the ffcv loader (a worker thread raised, the main
        # process waited forever); a shift of the whole image leaves nothing of it either.
        ("model: {arch: resnet9}\n", ["data.cutout=40"], ["data.cutout", "at most 31, got 40"]),
        ("model: {arch: resnet9}\n", ["data.translate=32"], ["data.translate", "at most 31, got 32"]),
        ("model: {arch: resnet9}\noptim: [1, 2]\n", [], ["run.yaml", "optim", "expected a mapping"]),
        ("model: {arch: resnet9\n", [], ["run.yaml", "not valid YAML"]),
    ],
)
def test_bad_config_is_one_error_naming_file_and_key(tmp_path, text, overrides, fragments):
    path = _write(tmp_path, "run.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, archs=models.names())  # as the commands load it
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_architecture_is_the_commands_check_not_the_schemas(tmp_path):
    # The schema knows no registry (trainer.models imports trainer.config, not the other way); each
    # command passes the registry's names, and the error names where the value came from.
    path = _write(tmp_path, "run.yaml", "model: {arch: resnet9}\n")
    assert load_config(path, ["model.arch=resnet99"]).model.arch == "resnet99"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.arch=resnet99"], archs=models.names())
    assert str(info.value) == (f"{path} + override 'model.arch=resnet99': model.arch: unknown architecture "
                               f"'resnet99'; valid: {', '.join(models.names())}")
    bad = run_cli("-m", "trainer.config", str(path), "model.arch=resnet99")
    assert bad.returncode == 1 and "unknown architecture 'resnet99'" in bad.stderr, bad.stderr


def test_the_schema_and_its_loader_import_nothing_from_the_models():
    # The schema (trainer/config/__init__.py) is a lower room: trainer/models/options.py imports it.
    # Only its command, trainer/config/__main__.py (`python -m trainer.config`), reaches the
    # registry, as the other commands do. The strict loader knows no schema at all.
    def project_imports(path):
        modules = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules |= {f"{node.module}.{a.name}" for a in node.names}
        return {m.rsplit(".", 1)[0] for m in modules if m.startswith("trainer.")}

    assert project_imports(REPO / "trainer/config/__init__.py") == {"trainer.files", "trainer.strict_yaml"}
    assert project_imports(REPO / "trainer/strict_yaml.py") == {"trainer"}  # UserError


def test_retired_keys_and_values_name_their_replacement(tmp_path):
    path = _write(tmp_path, "run.yaml", "model: {arch: resnet9}\noptim: {schedule: onecycle}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: optim\.schedule: 'onecycle' is now called 'triangle'$"):
        load_config(path)
    for value in ("5", ".inf", "true", "[1]"):
        with pytest.raises(ConfigError) as info:
            load_config(None, ["model.arch=resnet9", f"train.time_budget_s={value}"])
        assert str(info.value) == (f"override 'train.time_budget_s={value}': train.time_budget_s: removed; use "
                                   "train.budget_s=N (fits the steps to N seconds and ends mid-epoch if need be)")
    for value in ("0", "0.0", "false", "null"):  # the old "off" loads, as old run folders hold it
        assert load_config(None, ["model.arch=resnet9", f"train.time_budget_s={value}"]) == load_config(
            None, ["model.arch=resnet9"])


def test_error_in_base_names_the_base_file(tmp_path):
    _write(tmp_path, "base.yaml", "optim: {momentun: 0.9}\n")
    path = _write(tmp_path, "arch.yaml", "extends: base.yaml\nmodel: {arch: resnet9}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'optim\.momentun'"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.arch=vgg_bn", "optim.lr=1e-5", "logging.group=sweep-1", "logging.tags=[x]"])
    assert from_yaml(to_yaml(cfg)) == cfg
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert isinstance(cfg, Config)


def test_cli_prints_resolved_config_and_fails_cleanly(tmp_path):
    path = _write(tmp_path, "run.yaml", "model: {arch: resnet9}\n")
    ok = run_cli("-m", "trainer.config", str(path), "optim.lr=0.3")
    assert ok.returncode == 0, ok.stderr
    assert from_yaml(ok.stdout).optim.lr == 0.3
    bad = run_cli("-m", "trainer.config", str(path), "optim.lr=0.3", "data.batchsize=8")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "error: override 'data.batchsize=8': unknown key 'data.batchsize' (did you mean 'data.batch_size'?)"
    ]


def test_shipped_configs_load_and_cover_every_architecture():
    # Configs beyond one per architecture, and the architecture each one trains.
    extra = {"tiny.yaml": "resnet9_tiny", "speed.yaml": "airbench94", "speed-resnet9.yaml": "resnet9"}
    own = set()  # architectures with a config named after them
    for path in sorted((REPO / "jobs/configs").glob("*.yaml")):
        if path.name == "base.yaml":
            continue  # shared recipe, no architecture of its own
        arch = load_config(path).model.arch
        if path.name in extra:
            assert arch == extra[path.name], path.name
        else:
            assert path.name == f"{arch}.yaml", path.name
            own.add(arch)
    assert own | {extra["tiny.yaml"]} == set(models.names())  # resnet9_tiny has only tiny.yaml


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ("model: {arch: resnet9}\noptim: {lr: .nan}\n", [], "optim.lr"),
        ("model: {arch: resnet9}\noptim: {momentum: .inf}\n", [], "optim.momentum"),
        ("model: {arch: resnet9}\n", ["optim.weight_decay=.NaN"], "optim.weight_decay"),
        ("model: {arch: resnet9}\n", ["optim.label_smoothing=.nan"], "optim.label_smoothing"),
        ("model: {arch: resnet9}\n", ["optim.warmup_epochs=.inf"], "optim.warmup_epochs"),
        ("model: {arch: resnet9}\n", ["train.budget_s=.inf"], "train.budget_s"),
        ("model: {arch: resnet9}\n", ["train.ema=.nan"], "train.ema"),
        ("model: {arch: resnet9}\n", ["optim.lr=1e999"], "optim.lr"),  # a float literal that overflows to inf
        ("model: {arch: resnet9}\n", ["optim.lr=1" + "0" * 400], "optim.lr"),  # an int no float can hold
    ],
)
def test_every_float_is_finite_or_an_error(tmp_path, text, overrides, key):
    # nan slips through every range check (`nan <= 0` is False) and inf through the lower bounds;
    # training then fails late. The loader refuses both, naming where the value came from.
    path = _write(tmp_path, "run.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert f"{key}: expected a finite number" in message, message
    assert (f"override '{overrides[0]}'" if overrides else "run.yaml") in message, message


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_data_needs_amp(dtype):
    # Without autocast the network runs in float32, so bf16/fp16 batches would meet float32 weights
    # in the first convolution: one config error naming both keys instead.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.arch=resnet9_tiny", f"data.dtype={dtype}", "train.amp=false"])
    message = str(info.value)
    assert "\n" not in message
    assert f"data.dtype={dtype}" in message and "train.amp=false" in message and "data.dtype=float32" in message
    assert load_config(None, ["model.arch=resnet9_tiny", "data.dtype=float32", "train.amp=false"]).train.amp is False
    assert load_config(None, ["model.arch=resnet9_tiny", f"data.dtype={dtype}", "train.amp=true"]).data.dtype == dtype


@pytest.mark.parametrize("amp", ["false", "auto"])
def test_amp_off_with_a_bf16_config_is_one_line_from_the_trainer(amp, tmp_path, beton_dir):
    # speed.yaml hands out bf16 batches; turning AMP off used to die in the first forward with a
    # long traceback and an abort (exit 134). Now the command stops before touching anything.
    run_dir = tmp_path / "run"
    r = run_cli("-m", "trainer", "--config", "jobs/configs/speed.yaml", "--run-dir", str(run_dir),
                f"data.dir={beton_dir}", f"train.amp={amp}", "logging.mode=disabled")
    assert r.returncode == 1, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert f"override 'train.amp={amp}'" in lines[0] and "data.dtype=float32" in lines[0]
    assert not run_dir.exists()


def test_every_profile_resolves_with_every_config():
    # What the launcher does for each job (config, its arch, the profile's overrides), for every
    # profile and every shipped config: a key renamed in trainer/config/ or a profile/recipe
    # combination the checks refuse (budget_s with patience, an on-device augmentation without the
    # resident loader) fails here, not when a sweep is submitted.
    from trainer.launch import load_profiles

    profiles = load_profiles()
    assert {"full", "smoke", "budget", "budget-cpu"} <= set(profiles)
    configs = {p: load_config(p).model.arch for p in sorted((REPO / "jobs/configs").glob("*.yaml")) if p.name != "base.yaml"}
    assert len(configs) >= 10
    for name, overrides in profiles.items():
        for path, arch in configs.items():
            try:
                cfg = load_config(path, [f"model.arch={arch}", *overrides])
            except ConfigError as e:
                pytest.fail(f"profile {name} x {path.name}: {e}")
            if name.startswith("budget"):
                # a fitted schedule: no early stopping, eager (see profiles.yaml)
                assert cfg.train.budget_s > 0 and cfg.train.patience == 0
                assert cfg.train.compile is False and cfg.data.loader == "resident", (name, path.name)


def test_budget_profiles_fit_their_stated_totals():
    # profiles.yaml states ~8 minutes for the seven on a GPU and ~10 on 2 CPU cores; the budgets
    # alone (start-up and the report come on top) must leave room for that.
    from trainer.launch import load_profiles

    seven = len(models.seed_names())
    assert seven == 7
    for name, total_s in (("budget", 8 * 60), ("budget-cpu", 10 * 60)):
        budget = load_config(None, ["model.arch=resnet9", *load_profiles()[name]]).train.budget_s
        assert 0.75 * total_s <= seven * budget <= 0.95 * total_s, (name, budget)


def test_recipes_follow_the_issue_14_rules():
    # The per-architecture recipe choices the configs' comments give reasons for.
    def cfg(name):
        return load_config(REPO / "jobs/configs" / name)

    for arch in models.seed_names():
        c = cfg(f"{arch}.yaml")
        assert c.train.tta and c.train.epochs == 150 and c.train.patience == 20, arch  # the seed's budget kept
        bn_lr = {"alexnet": 0.02, "efficientnet": 0.1}.get(arch, 0.2)
        assert c.optim.lr == bn_lr, arch
        assert c.data.cutout == (12 if arch in ("resnet", "vgg_bn") else 8), arch
        assert c.model.output_stride == (8 if arch in ("mobilenet", "mobilenet_big", "efficientnet") else None), arch
    assert cfg("efficientnet_b0.yaml").model.output_stride == 8 and cfg("efficientnet_b0.yaml").optim.lr == 0.1
    speed = cfg("speed.yaml")
    assert (speed.data.loader, speed.data.flip_mode, speed.data.translate, speed.data.translate_mode) == (
        "resident", "alternate", 2, "reflect")
    assert speed.model.whiten and speed.model.dirac_init and speed.model.bn_frozen_scale
    assert (speed.model.activation, speed.model.bn_momentum, speed.model.bn_eps) == ("gelu", 0.4, 1e-12)
    assert speed.optim.bias_lr_mult == 64 and speed.optim.label_smoothing == 0.2
    assert speed.train.lookahead_every == 5 and speed.train.tta and speed.train.tta_translate == 1
    assert speed.train.epochs <= 12 and speed.train.ema == 0
    # airbench94's decoupled lr 11.5 / wd 0.0153 per 1024 at momentum 0.85, in torch's convention
    lr_1024 = speed.optim.lr * speed.data.batch_size / 256
    assert abs(lr_1024 - 11.5 / (1 + 1 / (1 - speed.optim.momentum))) < 0.01
    assert abs(lr_1024 * speed.optim.weight_decay - 0.0153 / (1 + 1 / (1 - 0.85))) < 1e-5
