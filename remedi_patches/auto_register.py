"""Make `import remedi_patches` enough for `AutoModel.from_pretrained(<LLaDA or RemeDi folder>)`, without importing
transformers.

Importing transformers (and the native LLaDA model) costs seconds, and most entry points must reject a bad flag
before paying that. So instead of registering model_types "llada" and "RemeDi" eagerly, `install()` registers them
once transformers' Auto modules are imported: right away when they already are, otherwise through a finder on
`sys.meta_path` that watches the `transformers.*` imports and registers when the outermost one has finished
(registering in the middle of transformers' own import chain would import half-initialised modules). The finder
removes itself once both registrations are done. `import remedi_patches.llada` registers eagerly, as before.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType
from typing import Callable

log = logging.getLogger(__name__)

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"


def _register_config(module: ModuleType) -> None:
    from remedi_patches.llada.configuration_llada import LLaDAConfig
    from remedi_patches.llada.configuration_remedi import RemeDiConfig

    for config in (LLaDAConfig, RemeDiConfig):
        module.AutoConfig.register(config.model_type, config, exist_ok=True)


def _register_models(module: ModuleType) -> None:
    from remedi_patches.llada.configuration_llada import LLaDAConfig
    from remedi_patches.llada.configuration_remedi import RemeDiConfig
    from remedi_patches.llada.modeling_llada import LLaDAModelLM
    from remedi_patches.llada.modeling_remedi import RemeDiUPMModelLM

    for config, model in ((LLaDAConfig, LLaDAModelLM), (RemeDiConfig, RemeDiUPMModelLM)):
        module.AutoModel.register(config, model, exist_ok=True)
        module.AutoModelForCausalLM.register(config, model, exist_ok=True)


PENDING: dict[str, Callable[[ModuleType], None]] = {CONFIG_AUTO: _register_config, MODELING_AUTO: _register_models}
_depth = 0  # transformers modules being executed right now (nested imports)
_running = False


def _run_pending() -> None:
    global _running
    if _running:  # the registration's own transformers imports end here too
        return
    _running = True
    try:
        for name in list(PENDING):  # config first: the model registration needs it
            module = sys.modules.get(name)
            register = PENDING.pop(name) if module is not None else None
            if register is not None:
                _register(name, register, module)
    finally:
        _running = False
    if not PENDING and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def _register(name: str, register: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        register(module)
    except Exception as err:  # noqa: BLE001  never break the user's import; our loaders register explicitly
        log.warning("could not register the native LLaDA model with %s (%s: %s); `import remedi_patches.llada` "
                    "registers it explicitly", name, type(err).__name__, err)


class _Watched(importlib.abc.Loader):
    """Delegates to the real loader; when the outermost transformers module finishes, runs what is pending."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        global _depth
        _depth += 1
        try:
            self._loader.exec_module(module)
        finally:
            _depth -= 1
        if _depth == 0 and PENDING:
            _run_pending()

    def __getattr__(self, attr):  # get_source, get_filename, get_resource_reader, is_package, ...
        return getattr(self._loader, attr)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if not PENDING or not (fullname == "transformers" or fullname.startswith("transformers.")):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or isinstance(spec.loader, _Watched):
            return spec
        spec.loader = _Watched(spec.loader)
        return spec


_FINDER = _TransformersFinder()


def install() -> None:
    """Register now when transformers' Auto modules are already imported; otherwise watch for them (idempotent)."""
    if any(name in sys.modules for name in PENDING):
        _run_pending()
    if PENDING and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
