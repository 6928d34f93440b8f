"""Text-only items and online serving on a trained AlphaFuse model (real MiniLM embeddings, the real
decompose and train stages): an item added by its text alone is recommended to users whose
histories read like it; the Ray Serve endpoint answers real HTTP requests on loopback, batched,
exactly as the library does."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from alphafuse_dist import cli
from alphafuse_dist.config import load_config
from alphafuse_dist.errors import ConfigError, DataError
from alphafuse_dist.pipeline import run_pipeline
from alphafuse_dist.serve.export import export_run
from alphafuse_dist.serve.recommend import Recommender

pytestmark = pytest.mark.slow  # a real training run and a Ray Serve deployment: about a minute

# topic -> (genre words, title words); every user stays within one topic
TOPICS = {
    "space": ("Science fiction about starships, alien planets and astronauts in outer space",
              ["Galactic", "Nebula", "Orbit", "Starship", "Comet", "Quasar", "Cosmos", "Asteroid"]),
    "cooking": ("Documentary about chefs, recipes, baking bread and cooking in restaurant kitchens",
                ["Kitchen", "Recipe", "Bakery", "Spice", "Pastry", "Harvest", "Feast", "Oven"]),
    "horror": ("Horror about ghosts, haunted houses, zombies and a killer in the dark",
               ["Haunting", "Shadow", "Crypt", "Phantom", "Graveyard", "Curse", "Nightmare", "Specter"]),
    "western": ("Western about cowboys, outlaws, horses and sheriffs in the desert frontier",
                ["Saddle", "Outlaw", "Canyon", "Sheriff", "Mustang", "Frontier", "Rodeo", "Dusty"]),
    "romance": ("Romantic comedy about love, weddings, dating and a couple falling in love",
                ["Kiss", "Wedding", "Valentine", "Sweetheart", "Honeymoon", "Darling", "Crush", "Rose"]),
    "sports": ("Sports drama about a football team, a boxing champion and winning the final match",
               ["Champion", "Stadium", "Knockout", "Touchdown", "Rookie", "Playoff", "Goal", "Victory"]),
}
N_USERS = 240


def _text(topic: str, i: int) -> str:
    genres, words = TOPICS[topic]
    return f"{words[i]} {'I' * (1 + i % 3)}. Genres: {genres}."


@pytest.fixture(scope="module")
def export(tmp_path_factory, ray_session):
    """(export folder, topic -> item ids)."""
    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    by_topic = {t: [f"{t[:3]}{i}" for i in range(8)] for t in TOPICS}
    rows = ["user_id,item_id,timestamp"]
    for u in range(N_USERS):
        topic = list(TOPICS)[u % len(TOPICS)]
        for t, i in enumerate(rng.permutation(8)[:rng.integers(5, 9)]):
            rows.append(f"u{u},{by_topic[topic][i]},{1000 + 10 * t}")
    (root / "inter.csv").write_text("\n".join(rows) + "\n")
    (root / "items.csv").write_text("item_id,title\n" + "".join(
        f'{by_topic[t][i]},"{_text(t, i)}"\n' for t in TOPICS for i in range(8)))
    cfg = load_config("quickstart", [
        "data.source=interactions", f"data.path={root / 'inter.csv'}", f"data.items_path={root / 'items.csv'}",
        "data.text_template={title}", f"run_dir={root / 'run'}", "model.dim=32", "model.id_dims=16",
        "model.max_len=8", "train.backend=torch", "train.num_workers=1", "train.batch_size=32", "train.epochs=12",
        "train.patience=12", "train.num_negatives=16", "train.lr=0.005", "train.log_every=0", "model.dropout=0.0"])
    run_pipeline(cfg, stages=("prepare", "embed", "decompose", "train"))
    return export_run(root / "run"), by_topic


def _rank(rows: list[dict], item_id: str) -> int:
    return next(r["rank"] for r in rows if r["item_id"] == item_id)


def test_a_text_only_item_is_recommended_to_histories_that_read_like_it(export):
    folder, by_topic = export
    rec = Recommender(folder)
    card = json.loads((folder / "model_card.json").read_text())
    assert card["text_items"]["supported"] and card["text_items"]["self_check_max_relative_error"] < 1e-3
    everything = 48 + 1
    elsewhere = []
    for topic, ids in by_topic.items():
        # a new item whose text duplicates the topic's first item; the history: five of the others,
        # masked, so that the topic has 3 catalogue candidates left besides the new item
        new = [{"id": "new-dup", "text": _text(topic, 0)}]
        rows = rec.recommend(ids[1:6], k=everything, new_items=new, exclude_history=True)
        assert len(rows) == everything - 5 and [r["new"] for r in rows].count(True) == 1
        dup, original = _rank(rows, "new-dup"), _rank(rows, ids[0])
        assert dup <= 4 and abs(dup - original) <= 2, (topic, dup, original)  # random: 22 on average
        elsewhere += [_rank(rec.recommend(o[1:6], k=everything, new_items=new, exclude_history=True), "new-dup")
                      for t, o in by_topic.items() if t != topic]
    assert np.mean(elsewhere) > 15  # users of the other topics rank it far below
    # a text never seen (same genre line, a new title) lands among its topic too, and a history
    # made of that item alone gets the topic's items
    fresh = [{"id": "tt-new", "text": f"Interstellar Drift II. Genres: {TOPICS['space'][0]}."}]
    rows = rec.recommend(by_topic["space"][:5], k=everything, new_items=fresh, exclude_history=True)
    assert _rank(rows, "tt-new") <= 4
    top = rec.recommend(["tt-new"], k=8, new_items=fresh, exclude_history=True)
    assert sum(r["item_id"] in by_topic["space"] for r in top) >= 6 and not any(r["new"] for r in top)
    with pytest.raises(ConfigError, match="already in the catalogue"):
        rec.recommend(["spa1"], new_items=[{"id": "spa1", "text": "x"}])


def test_the_text_basis_is_checked_against_the_model_card(export, tmp_path):
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(export[0], folder)
    basis = folder / "text_basis.safetensors"
    data = basis.read_bytes()
    basis.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DataError, match="sha256 differs from the model card's"):
        Recommender(folder)


def test_cli_recommend_with_text_only_items(export, tmp_path, capsys):
    folder, by_topic = export
    args = ["recommend", "--run", str(folder), "--k", "49", "--json", "--item", by_topic["horror"][1],
            "--item", "tt9", "--item", "unknown-x"]
    assert cli.main(args + ["--new-item", "tt9", "--new-item-text", _text("horror", 0)]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert "left out 1 unknown item(s) 'unknown-x'" in err and _rank(rows, "tt9") <= 8
    (tmp_path / "new.json").write_text(json.dumps([{"id": "tt9", "text": _text("horror", 0)}]))
    assert cli.main(args + ["--new-items", str(tmp_path / "new.json")]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert cli.main(args + ["--new-item", "tt9"]) == 2
    assert "--new-item is given 1 time(s) and --new-item-text 0" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('[{"id": "a"}]')
    assert cli.main(args + ["--new-items", str(tmp_path / "bad.json")]) == 2
    assert f"--new-items {tmp_path / 'bad.json'}[0]: expected" in capsys.readouterr().err


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_ray_serve_endpoint_over_http(export):
    from ray import serve

    from alphafuse_dist.serve.app import run_server

    folder, by_topic = export
    port = 18321
    run_server(folder, "127.0.0.1", port, max_batch_size=8, batch_wait_ms=20)
    url = f"http://127.0.0.1:{port}/"
    try:
        rec = Recommender(folder)
        new = [{"id": "tt7", "text": _text("western", 2)}]
        bodies = [{"history": ids[:4] + ["tt7"], "k": 10, "new_items": new} for ids in by_topic.values()]
        bodies += [{"history": [rec.titles[3], "nope"], "k": 3}]  # a title, an unknown id
        with ThreadPoolExecutor(8) as pool:  # concurrent: batched by @serve.batch
            answers = list(pool.map(lambda b: _post(url, b), bodies * 3))
        for body, (status, got) in zip(bodies * 3, answers):
            assert status == 200, got
            q = Recommender.query  # the library's answer to the same request
            expected = rec.answer([q(rec, body["history"], body["k"], new_items=body.get("new_items", []))])[0]
            assert [r["item_id"] for r in got["items"]] == [r["item_id"] for r in expected]
            assert np.allclose([r["score"] for r in got["items"]], [r["score"] for r in expected], atol=1e-5)
        assert answers[-1][1]["dropped"] == ["nope"] and len(answers[-1][1]["items"]) == 3
        assert _rank(answers[3][1]["items"], "tt7") <= 3  # the western history gets the western text item
        for body, message in (({"history": []}, "history: empty"), ({"history": ["nope"]}, "no known item"),
                              ({"history": "spa1"}, "history: expected a list"),
                              ({"history": ["spa1"], "k": 0}, "k=0"), ({"histories": []}, "unknown field"),
                              (b"{not json", "not JSON")):
            status, got = _post(url, body)
            assert status == 400 and message in got["error"], (body, got)
    finally:
        serve.shutdown()
