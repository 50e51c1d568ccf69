"""GPU providers are a registry (pagating/cloud/provider.py): one registration gives `pagating <name> ...` with
every verb of the shared flows (pagating/cloud/cli.py); the provider's module is imported only to run one."""

import sys
import textwrap

import pytest

from pagating import cli
from pagating.cloud import provider

TOY_MODULE = '''
class Toy:
    name = "toygpu"

    def __init__(self, need_key):
        self.need_key = need_key


def connect(need_key):
    return Toy(need_key)
'''
SHARED_VERBS = {"offers", "launch", "status", "watch", "logs", "destroy", "watchdog"}


@pytest.fixture
def toy_registered(tmp_path, monkeypatch):
    (tmp_path / "toygpu_provider.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(provider, "PROVIDERS", dict(provider.PROVIDERS))  # the registration ends with the test
    monkeypatch.delitem(sys.modules, "toygpu_provider", raising=False)
    provider.register_provider("toygpu", "toygpu_provider")


def test_unregistered_provider_is_not_a_verb(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["toygpu", "offers"])
    assert exc.value.code == 2 and "invalid choice: 'toygpu'" in capsys.readouterr().err


def test_registered_provider_gets_the_shared_verbs(toy_registered):
    # It sits beside vast in the registry, and running its verb builds only its own parser ...
    assert {"vast", "toygpu"} <= set(provider.PROVIDERS)
    top = cli.build_parser(["toygpu"])._subparsers._group_actions[0].choices
    assert top.keys() == {"toygpu"}
    verbs = top["toygpu"]._subparsers._group_actions[0].choices
    assert set(verbs) == SHARED_VERBS
    # ... with the cloud settings' flags (config.CLOUD_VERBS name the flows, not a provider)
    flags = {opt for action in verbs["launch"]._actions for opt in action.option_strings}
    assert {"--gpu-name", "--budget", "--image", "--start-timeout", "--instances", "--interruptible"} <= flags
    assert "toygpu_provider" not in sys.modules  # the parser needs nothing of the provider's module


def test_the_provider_module_is_imported_when_its_client_is_asked_for(toy_registered):
    client = provider.client("toygpu", need_key=False)
    assert client.name == "toygpu" and client.need_key is False and "toygpu_provider" in sys.modules


def test_vast_is_a_registered_provider_module():
    assert provider.PROVIDERS["vast"] == "pagating.cloud.providers.vast"
