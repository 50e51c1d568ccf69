"""pagating/config.py: each setting declared once, and what comes from the declarations (the flags of every
verb, --profile/--set everywhere, the sweep's axes, MLproject, the typing of load_config), plus dvc.yaml's
per-key params."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli

from pagating import config, mlproject
from pagating.config import SETTINGS, UserError, config_from_args, load_config

# Every verb that reads params.yaml, as `pagating <verb...>`.
CONFIG_VERBS = ["train", "sweep", "quickstart", "report", "prepare", "grant", "vast offers", "vast launch"]
DVC = [str(Path(sys.executable).parent / "dvc")]


def parse(verb: str, argv: list[str]):
    """`pagating <verb> <argv>` parsed by the verb's real parser."""
    from pagating.cli import build_parser

    words = verb.split()
    return build_parser(words).parse_args([*words, *argv])


def other_value(s: config.Setting):
    """A valid value of `s` that differs from its default, as typed on a command line."""
    return {str: "other/value", int: "7", float: "0.25", bool: "true"}[s.type]


# ---- declarations -> flags -----------------------------------------------------------------------

@pytest.mark.parametrize("verb", CONFIG_VERBS)
def test_every_verb_takes_profile_and_set_with_one_dest(verb):
    args = parse(verb, ["--profile", "wikitext103", "--set", "train.max_steps=7", "--set", "cloud.budget_usd=3"])
    assert args.profile == "wikitext103" and args.sets == ["train.max_steps=7", "cloud.budget_usd=3"]
    if verb.startswith("vast"):
        return  # vast takes cloud.* only: test_vast_set_takes_cloud_settings_only
    cfg = config_from_args(args)
    assert cfg["profile"] == "wikitext103" and cfg["train"]["max_steps"] == 7 and cfg["cloud"]["budget_usd"] == 3


def test_each_declared_flag_exists_on_its_verbs_and_sets_its_setting():
    flagged = [s for s in SETTINGS.values() if s.verbs]
    assert {s.key for s in flagged} >= {"train.alpha_mode", "train.learning_rate", "train.max_steps", "model.unit",
                                       "cloud.gpu_name", "cloud.budget_usd"}
    for s in flagged:
        for declared in s.verbs:
            # the shared cloud flows' verbs ("cloud launch") are each provider's ("vast launch")
            verb = declared.replace("cloud", "vast", 1) if declared.startswith("cloud ") else declared
            for flag in s.flags:
                args = parse(verb, [flag, other_value(s)])
                assert getattr(args, s.key) == other_value(s), (verb, flag)
                if verb == declared:
                    section, _, key = s.key.partition(".")
                    assert config_from_args(args)[section][key] == config.typed(s.key, yaml.safe_load(other_value(s)))
    # a flag is only where it is declared: the sweep varies α, it has no --alpha_mode
    with pytest.raises(SystemExit):
        parse("sweep", ["--alpha_mode", "learnable"])


def test_seed_flags_parse_to_the_seed_config():
    args = parse("train", ["--alpha_mode", "static_0.0", "--learning_rate", "5e-4", "--batch_size", "16",
                           "--max_steps", "20000", "--output_dir", "logs/phase2_sweeps"])
    t = config_from_args(args)["train"]
    assert (t["alpha_mode"], t["learning_rate"], t["batch_size"], t["max_steps"], t["output_dir"]) == \
        ("static_0.0", 5e-4, 16, 20000, "logs/phase2_sweeps")
    # dashes work too, and MLproject's float parameters give whole numbers as 16.0
    t = config_from_args(parse("train", ["--batch-size", "16.0", "--max-steps", "20.0"]))["train"]
    assert t["batch_size"] == 16 and isinstance(t["batch_size"], int) and t["max_steps"] == 20


def test_sweep_passes_its_train_flags_to_every_child():
    from pagating.config import sets_from_args

    args = parse("sweep", ["--max_steps", "12", "--set", "model.ffn_dim=32"])
    assert sets_from_args(args) == ["train.max_steps=12", "model.ffn_dim=32"]


def test_sweep_axes_are_the_declared_axis_settings():
    from pagating import grid

    assert grid.AXES is config.AXES
    assert config.AXES == {"unit": "model.unit", "alpha_mode": "train.alpha_mode",
                           "learning_rate": "train.learning_rate", "seed": "train.seed"}
    configs = grid.grid(load_config("sample", {"sweep.seed": "[1.0, 2]", "sweep.learning_rate": "[1e-3]"}))
    assert {c["train.seed"] for c in configs} == {1, 2} and all(type(c["train.seed"]) is int for c in configs)
    with pytest.raises(UserError, match=r"train.seed must be a whole number, got 1.5"):
        grid.grid(load_config("sample", {"sweep.seed": "[1.5]"}))


# ---- load_config: typed, every declared key present ------------------------------------------------

def test_every_declared_key_is_present_with_its_declared_type(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["model"]["sample"]["dropout"], params["tracking"]["drain_timeout_s"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = load_config("sample", path=tmp_path / "params.yaml")
    for key, s in SETTINGS.items():
        section, _, name = key.partition(".")
        assert isinstance(cfg[section][name], s.type if s.type is not float else (int, float)), key
    assert cfg["model"]["dropout"] == config.Model.dropout and cfg["tracking"]["drain_timeout_s"] == 1800


@pytest.mark.parametrize("overrides, message", [
    ({"train.learning_rate": "fast"}, "train.learning_rate must be a number, got 'fast'"),
    ({"train.batch_size": "8.5"}, "train.batch_size must be a whole number, got 8.5"),
    ({"model.param_matched": "maybe"}, "model.param_matched must be true or false, got 'maybe'"),
    ({"data.nope": "1"}, "unknown setting 'data.nope'"),
])
def test_wrong_type_or_unknown_key_is_a_user_error(overrides, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config("sample", overrides)


def test_string_settings_keep_the_text_as_given():
    cfg = load_config("sample", {"model.init": "yes", "cloud.gpu_name": "4090", "train.output_dir": "2024"})
    assert (cfg["model"]["init"], cfg["cloud"]["gpu_name"], cfg["train"]["output_dir"]) == ("yes", "4090", "2024")


def test_set_works_on_report(tmp_path):
    proc = run_cli(["report", "--set", "tracking.nope=1"], cwd=REPO)
    assert proc.returncode == 2 and "unknown setting 'tracking.nope'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    cfg = config_from_args(parse("report", ["--set", "tracking.experiment_prefix=mine"]))
    assert config.experiment_name(cfg) == "mine-sample"


# ---- MLproject ---------------------------------------------------------------------------------------

def test_committed_mlproject_is_the_generated_one():
    assert (REPO / "MLproject").read_text() == mlproject.mlproject_text(REPO / "params.yaml"), \
        "MLproject is stale: run `python -m pagating.mlproject > MLproject`"


def test_mlproject_parameters_are_typed_declared_flags():
    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    assert set(spec) == {"main", "sweep", "train", "train_wikitext103", "report"}
    for name, p in spec["train"]["parameters"].items():
        declared = [s for s in SETTINGS.values() if s.flags[0] == f"--{name}"]
        if name == "resume":
            assert not declared and p == {"type": "string", "default": "none"}
            continue
        assert len(declared) == 1 and "train" in declared[0].verbs
        assert p["type"] == ("string" if declared[0].type is str else "float"), name
        assert f"--{name} {{{name}}}" in spec["train"]["command"]


def test_mlproject_defaults_are_params_yaml_values():
    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for entry in ("main", "sweep", "report"):
        assert spec[entry]["parameters"]["profile"]["default"] == params["profile"]
    for entry, profile in (("train", "sample"), ("train_wikitext103", "wikitext103")):
        assert f"--profile {profile} " in spec[entry]["command"]
        for key, p in spec[entry]["parameters"].items():
            section = "model" if key == "unit" else "train"
            if key != "resume":
                assert p["default"] == params[section][profile][key], (entry, key)
            assert p["default"] not in ("", None)


# ---- dvc.yaml ----------------------------------------------------------------------------------------

def _stage_params() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: [p for p in stage.get("params", [])] for name, stage in stages.items()}


def test_dvc_stage_params_name_declared_keys_of_the_chosen_profile_only():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage, keys in _stage_params().items():
        assert keys and keys[0] == "profile", stage
        for key in keys[1:]:
            section, _, rest = key.partition(".")
            if section in config.PROFILED_SECTIONS:
                assert rest.startswith("${profile}"), (stage, key)
                name = rest.removeprefix("${profile}").lstrip(".")
                if section == "sweep":
                    assert name == "", (stage, key)  # the grid block: its axes are optional
                    continue
                for profile in params["data"]:  # present for every profile, so switching profile works
                    assert name in params[section][profile], (stage, key, profile)
                key = f"{section}.{name}"
            assert key in SETTINGS, (stage, key)
    # the sweep stage tracks every setting a run reads
    sweep = {k.replace(".${profile}", "") for k in _stage_params()["sweep"]}
    assert {k for k in SETTINGS if k.split(".")[0] in ("model", "train", "tracking")} <= sweep


def test_dvc_stages_depend_on_the_modules_they_run():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage, modules in (("prepare", {"config", "data"}),
                           ("sweep", {"config", "data", "tracking", "run", "train", "sweep", "model", "units",
                                      "alpha", "grid", "names", "identity", "trainer", "sweep_worker"}),
                           ("report", {"config", "tracking", "report", "names"})):
        paths = {f"pagating/{m}" if (REPO / "pagating" / m).is_dir() else f"pagating/{m}.py" for m in modules}
        assert paths <= set(stages[stage]["deps"]), stage


def test_editing_the_other_profiles_block_reruns_nothing(tmp_path):
    """Real DVC: lock the three stages, edit the wikitext103 block (nothing to rerun), then the sample one."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "pagating", repo / "pagating", ignore=shutil.ignore_patterns("__pycache__"))
    for path in ("data/raw/wiki.train.tokens", "data/prepared/sample/meta.json", "reports/sweep.json",
                 "reports/summary.md", "reports/metrics.json", "reports/plots/eval_loss.csv",
                 "reports/plots/final_eval_loss.csv", "reports/plots/eval_loss.png",
                 "reports/plots/final_eval_loss.png", "reports/plots/alpha.png", "reports/plots/perf.png"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(path)

    def dvc(*args: str) -> str:
        proc = subprocess.run([*DVC, *args], cwd=repo, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    dvc("init", "--no-scm", "-q")
    dvc("commit", "-f", "-q")  # record the current params and deps as done, without running anything
    assert "up to date" in dvc("status")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["wikitext103"]["block_size"] = 256
    params["train"]["wikitext103"]["max_steps"] = 5
    params["sweep"]["wikitext103"]["learning_rate"] = [1e-4]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "up to date" in dvc("status")
    params["train"]["sample"]["max_steps"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    status = dvc("status")
    assert "sweep:" in status and "train.sample.max_steps" in status and "prepare:" not in status
