"""Plugins: a loss class from a dotted path, where it may be loaded from, and the errors for wrong paths."""

from __future__ import annotations

import sys
import uuid

import pytest

from lorafit.config.objective import ObjectiveConfig, PluginsConfig
from lorafit.errors import LorafitError
from lorafit.training.objectives import ContrastiveObjective, Objective, SupervisedObjective, build_objective
from lorafit.training.plugins import load_plugin

PLUGIN = '''
from lorafit.training.objectives import SupervisedObjective

RAN = []  # proves the module ran (importing is code execution)
RAN.append(1)


class ScaledLoss(SupervisedObjective):
    metric_names = ("scale",)

    def __init__(self, scale=1.0):
        self.scale = scale

    def compute(self, model, batch, totals=None):
        loss, _ = super().compute(model, batch, totals)
        return loss * self.scale, {"scale": self.scale}


class NotALoss:
    pass
'''


@pytest.fixture
def plugin_module(tmp_path):
    """A plugin module with a unique name (sys.modules caches by name) written next to a config file."""
    name = f"losses_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(PLUGIN, encoding="utf-8")
    yield name, tmp_path
    sys.modules.pop(name, None)


def test_a_class_next_to_the_config_loads_and_sys_path_is_left_alone(plugin_module):
    name, folder = plugin_module
    before = list(sys.path)
    cls = load_plugin(f"{name}:ScaledLoss", base=Objective, field="objective.type", config_dir=folder)
    assert cls.__name__ == "ScaledLoss" and issubclass(cls, Objective)
    assert sys.modules[name].RAN == [1]
    assert sys.path == before


def test_build_objective_passes_options(plugin_module):
    name, folder = plugin_module
    objective = build_objective(ObjectiveConfig(type=f"{name}:ScaledLoss", options={"scale": 0.5}), config_dir=folder)
    assert objective.scale == 0.5
    with pytest.raises(LorafitError, match=r"objective.options: .* does not accept them"):
        build_objective(ObjectiveConfig(type=f"{name}:ScaledLoss", options={"nope": 1}), config_dir=folder)


def test_builtin_objectives():
    assert type(build_objective(ObjectiveConfig())) is SupervisedObjective
    objective = build_objective(ObjectiveConfig(type="contrastive", temperature=0.1, pooling="mean", layer=2))
    assert isinstance(objective, ContrastiveObjective)
    assert (objective.temperature, objective.pooling, objective.layer) == (0.1, "mean", 2)


def test_a_module_outside_the_config_folder_and_installed_packages_is_refused(plugin_module, tmp_path_factory,
                                                                              monkeypatch):
    name, folder = plugin_module
    monkeypatch.syspath_prepend(str(folder))  # importable, like a module in the working directory
    other = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(LorafitError) as info:
        load_plugin(f"{name}:ScaledLoss", base=Objective, field="objective.type", config_dir=other)
    text = str(info.value)
    assert "outside the installed packages and the config's folder" in text and "allow_external_code" in text
    assert name not in sys.modules  # refused before anything ran
    cls = load_plugin(f"{name}:ScaledLoss", base=Objective, field="objective.type", config_dir=other,
                      allow_external_code=True)
    assert cls.__name__ == "ScaledLoss"


def test_installed_and_builtin_classes_load():
    assert load_plugin("lorafit.training.objectives:ContrastiveObjective", base=Objective,
                       field="objective.type") is ContrastiveObjective
    import torch

    assert load_plugin("torch.nn:Linear", base=torch.nn.Module, field="x") is torch.nn.Linear


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:Loss", "objective.type: module 'no_such_module_xyz' not found"),
        ("{name}:Missing", "has no class 'Missing'"),
        ("{name}:NotALoss", "is not a lorafit.training.objectives.Objective subclass"),
        ("not a path", "is not a dotted path"),
    ],
)
def test_wrong_paths_are_clear_errors(plugin_module, spec, message):
    name, folder = plugin_module
    with pytest.raises(LorafitError) as info:
        load_plugin(spec.format(name=name), base=Objective, field="objective.type", config_dir=folder)
    assert message in str(info.value)
    if "Missing" in spec:
        assert "NotALoss, ScaledLoss" in str(info.value)  # the classes it does define


def test_objective_config_is_strict():
    with pytest.raises(ValueError, match="none of sft, contrastive, dpo, orpo, simpo, kto, grpo and not a dotted path.*did you mean "
                       "'contrastive'"):
        ObjectiveConfig(type="contrastiv")
    with pytest.raises(ValueError, match="temperature only apply to type: contrastive"):
        ObjectiveConfig(type="sft", temperature=0.1)
    with pytest.raises(ValueError, match="options are passed to a package.module:ClassName objective"):
        ObjectiveConfig(type="contrastive", options={"a": 1})
    with pytest.raises(ValueError, match="greater than 0"):
        ObjectiveConfig(type="contrastive", temperature=0)
    with pytest.raises(ValueError, match="not dotted paths"):
        PluginsConfig(callbacks=["monitors.Memory"])
    assert ObjectiveConfig(type="contrastive").temperature == 0.07


def test_the_sections_remember_the_config_folder(tmp_path):
    objective = ObjectiveConfig.model_validate({"type": "m:C"}, context={"base_dir": tmp_path})
    plugins = PluginsConfig.model_validate({"callbacks": ["m:C"]}, context={"base_dir": tmp_path})
    assert objective.config_dir == plugins.config_dir == str(tmp_path)
    assert ObjectiveConfig().config_dir is None
