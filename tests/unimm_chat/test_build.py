"""`mpm unimm build` end to end, as users run it."""

import json

import datasets

from mpm.cli import main
from unimm_chat import read_conversations


def flags(annotations):
    return [arg for name, path in annotations.items() for arg in (f"--{name.replace('_', '-')}", str(path))]


def test_cli_build_writes_every_export_and_the_stats(annotations, tmp_path, capsys):
    out = tmp_path / "unimm"
    assert (
        main(["unimm", "build", *flags(annotations), "--generator", "template", "--output", str(out), "--no-progress"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "40 dialogues from 40 images" in printed and "phrasing:" in printed
    llava = json.loads((out / "llava.json").read_text())
    assert len(llava) == 40 and llava[0]["image"] == f"{int(llava[0]['id']):012d}.jpg" and llava[0]["lang"] == "en"
    assert llava[0]["conversations"][0]["value"].startswith("<image>\n")
    assert len(list(read_conversations(out / "unimm_chat.jsonl"))) == 40
    assert len(datasets.load_from_disk(str(out / "dataset"))) == 40
    stats = json.loads((out / "stats.json").read_text())
    assert stats["turns_per_dialogue"]["mean"] > 5 and stats["tokens"]["total"] > 1000
    assert set(stats["coverage"]) == {"coco_captions", "aokvqa", "okvqa", "vqav2", "visdial"}
    assert set(stats["timings_s"]) == {"read", "merge", "generate", "write", "total"}
    assert stats["phrasing"]["max_share_of_dialogues"] <= 0.5  # 40 dialogues: the 20% bound is checked at 600
    assert (out / "config.yaml").exists()
    # the same seed gives the same data
    assert main(["unimm", "build", *flags(annotations), "--output", str(tmp_path / "again"), "--no-progress"]) == 0
    assert (tmp_path / "again" / "llava.json").read_bytes() == (out / "llava.json").read_bytes()


def test_only_some_sources_and_a_custom_image_pattern(annotations, tmp_path):
    out = tmp_path / "vqa_only"
    args = [
        "--vqav2-questions",
        str(annotations["vqav2_questions"]),
        "--vqav2-annotations",
        str(annotations["vqav2_annotations"]),
    ]
    assert (
        main(
            [
                "unimm",
                "build",
                *args,
                "--output",
                str(out),
                "--image-pattern",
                "COCO_train2014_{image_id:012d}.jpg",
                "--no-progress",
            ]
        )
        == 0
    )
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["coverage"]) == {"vqav2"}
    llava = json.loads((out / "llava.json").read_text())
    assert llava[0]["image"].startswith("COCO_train2014_")
    assert stats["dialogues"] + sum(stats["rejections"].values()) == stats["images"]


def test_bad_files_exit_2_with_the_file_and_key(tmp_path, capsys):
    bad = tmp_path / "captions.json"
    bad.write_text('{"images": []}')
    assert main(["unimm", "build", "--coco-captions", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "no key 'annotations'" in err
    assert main(["unimm", "build", "--output", str(tmp_path / "o")]) == 2
    assert "no annotation source given" in capsys.readouterr().err
    assert main(["unimm", "build", "--aokvqa", str(bad), "--generator", "openai", "--output", str(tmp_path / "o")]) == 2
    assert "needs --model" in capsys.readouterr().err
