"""The settings (config.py) as Hydra sees them: the config groups, where conf/ is, run folders.

- `register()` stores the schema and the groups in Hydra's ConfigStore: `run_config` (RunConfig with
  every default), `model=NAME` (one option per preset of tokenflow.models.presets, with the global
  overrides a preset brings, e.g. the tiny models' step counts), `method=pnp|sdedit` (config.METHODS) and
  `controlnet=none|canny|frames` (config.CONTROLNET_CONDITIONS; conf/controlnet/*.yaml add named
  checkpoints, e.g. controlnet=sd15_depth). conf/config.yaml picks the defaults of the groups;
  conf/experiment/*.yaml are named override sets.
- `${tokenflow_fresh_dir:PATH}` (conf/config.yaml's run and sweep dirs) creates PATH, or PATH-2,
  PATH-3, ... when another run holds it: the folder is made with one atomic mkdir, so two runs
  started in the same second never share one.
- `compose(overrides)` composes the config as the command line does, for tools and tests.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import CONTROLNET_CONDITIONS, METHODS, RunConfig

GROUPS = ("model", "method", "controlnet", "experiment")


def conf_dir() -> Path:
    """conf/: inside the installed package (a wheel carries it as tokenflow/conf), else the clone's."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if (packaged / "config.yaml").is_file() else Path(__file__).resolve().parent.parent / "conf"


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def controlnet_names() -> list[str]:
    """controlnet=NAME: the conditions (none, canny, frames), then conf/controlnet/*.yaml's named checkpoints."""
    return list(CONTROLNET_CONDITIONS) + sorted(p.stem for p in (conf_dir() / "controlnet").glob("*.yaml"))


def group_options(group: str) -> list[str]:
    """The options of a config group, as `group=NAME` takes them."""
    from .models.presets import PRESETS

    return {"model": lambda: list(PRESETS), "method": lambda: list(METHODS), "controlnet": controlnet_names,
            "experiment": experiment_names}[group]()


_fresh: dict[str, str] = {}


def fresh_dir(path: str) -> str:
    """`path` made now by this process, or `path-2`, `path-3`, ... when it exists (another run's).
    The same path asked for twice by one process (Hydra resolves the run dir more than once) is the
    same folder, as long as nothing has been written into it."""
    made = _fresh.get(path)
    if made is not None and os.path.isdir(made) and not os.listdir(made):
        return made
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    candidate, k = path, 1
    while True:
        try:
            os.mkdir(candidate)  # atomic: exactly one process creates a given folder
            break
        except FileExistsError:
            k += 1
            candidate = f"{path}-{k}"
    _fresh[path] = candidate
    return candidate


def register_resolvers() -> None:
    """The resolvers conf/config.yaml and sweeps use (idempotent). tokenflow.cli calls this on
    import, so a launcher's worker process, which unpickles the job from there, has them too."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("tokenflow_fresh_dir"):
        OmegaConf.register_new_resolver("tokenflow_fresh_dir", fresh_dir, use_cache=True)
    if not OmegaConf.has_resolver("mod"):  # device=cuda:${mod:${hydra:job.num},4}: one GPU per sweep job
        OmegaConf.register_new_resolver("mod", lambda a, b: int(a) % int(b))


def register() -> None:
    """Put the schema, the model presets, the methods and the ControlNet conditions into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import MISSING, OmegaConf

    from .config import ModelConfig
    from .models.presets import PRESETS

    register_resolvers()
    cs = ConfigStore.instance()
    schema = OmegaConf.structured(RunConfig)
    schema.method = MISSING  # chosen by the method group, whose options are different dataclasses
    cs.store(name="run_config", node=schema)
    for name, cls in METHODS.items():
        cs.store(group="method", name=name, node=cls)
    for name in CONTROLNET_CONDITIONS:  # merged into the schema's ControlNetConfig: the other keys keep their defaults
        cs.store(group="controlnet", name=name, node={"name": name})
    for p in PRESETS.values():
        node = {"model": ModelConfig(name=p.name, source=p.source, native_size=p.native_size), **(p.run_overrides or {})}
        cs.store(group="model", name=p.name, node=node, package="_global_")


def compose(overrides: list[str]) -> RunConfig:
    """The checked config of `tokenflow OVERRIDES` (overrides as Hydra reads them, i.e. prepared by
    tokenflow.overrides.prepare; no sweeps)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = hydra_compose("config", overrides=list(overrides))
    return RunConfig.from_hydra(cfg)
