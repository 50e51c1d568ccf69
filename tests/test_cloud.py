"""GPU providers are a registry in pagating/cloud.py: one module + one registration gives `pagating <name> ...`."""

import textwrap

import pytest

from pagating import cli, cloud

# The toy provider CONTRIBUTING.md describes: a `Provider` client and `register_cli`, reusing cloud.py.
TOY = '''
from pagating import cloud

DESTROYED = []


class Toy:  # cloud.Provider
    def search_offers(self, query, interruptible, disk_gb):
        return [{"id": 7, "gpu_name": "Toy GPU", "dph_total": 0.25}]

    def create(self, offer_id, label, exclude=frozenset(), **kwargs):
        return 70 + offer_id

    def destroy(self, instance_id):
        DESTROYED.append(instance_id)

    def instances(self):
        return []

    def instance(self, instance_id):
        return None


def cmd_offers(args):
    offers = Toy().search_offers({}, False, 10.0)
    print(cloud.format_table([[o["id"], o["gpu_name"], o["dph_total"]] for o in offers], ["id", "gpu", "$/h"]))


def cmd_destroy(args):
    for iid in args.ids:
        Toy().destroy(iid)


def register_cli(sub):
    toy = sub.add_parser("toygpu", help="rent a GPU on Toy")
    verbs = toy.add_subparsers(dest="toy_verb", required=True)
    verbs.add_parser("offers").set_defaults(func=cmd_offers)
    p = verbs.add_parser("destroy")
    p.add_argument("ids", nargs="+", type=int)
    p.set_defaults(func=cmd_destroy)
'''


@pytest.fixture
def toy_provider(tmp_path, monkeypatch):
    (tmp_path / "toygpu_provider.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cloud, "PROVIDERS", dict(cloud.PROVIDERS))  # the registration ends with the test
    cloud.register_provider("toygpu", "toygpu_provider")
    import toygpu_provider

    yield toygpu_provider


def test_unregistered_provider_is_not_a_verb(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["toygpu", "offers"])
    assert exc.value.code == 2 and "invalid choice: 'toygpu'" in capsys.readouterr().err


def test_registered_provider_gets_its_cli_verbs(toy_provider, capsys):
    assert cli.main(["toygpu", "offers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["id", "gpu", "$/h"] and out[1].split() == ["7", "Toy", "GPU", "0.25"]
    assert cli.main(["toygpu", "destroy", "71", "72"]) == 0
    assert toy_provider.DESTROYED == [71, 72]
    # It sits beside vast in the registry, and running its verb builds only its own parser.
    assert {"vast", "toygpu"} <= set(cloud.PROVIDERS)
    assert cli.build_parser(["toygpu"])._subparsers._group_actions[0].choices.keys() == {"toygpu"}
