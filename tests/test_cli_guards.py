"""`jaxdiff generate` with bad input: exit 2 and one line on stderr naming the input, before any
image is written; existing images are never overwritten."""

import os

import pytest

import main

BAD = [
    (["--steps", "1001", "--sampler", "dpmpp_2m_sde"], "steps=1001"),
    (["--cfg", "inf"], "guidance_scale"),
    (["--cfg", "nan"], "guidance_scale"),
    (["--guidance-rescale", "nan"], "guidance_rescale"),
    (["--seed", str(2 ** 64)], "seed"),
    (["--height", "100000", "--width", "100000", "--max-pixels", "0"], "need at least"),
    (["--height", "8192", "--width", "8192"], "pixels per image"),
    (["--height", "30"], "height"),
    (["--sampler", "eular"], "eular"),
    (["--batch", "0"], "num_images_per_prompt"),
]


@pytest.mark.parametrize("flags, named", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_generate_request_is_one_line(pipeline_dir, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    model = pipeline_dir("sd1")
    capsys.readouterr()  # building the fixture folder talks; the command must not
    steps = [] if "--steps" in flags else ["--steps", "1"]
    rc = main.main(["generate", "a red circle", "--model", model, "--out", str(out), *steps, *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert named in err
    assert not out.exists() or not os.listdir(out)


def test_an_unusable_out_folder_fails_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    rc = main.main(["generate", "x", "--model", str(tmp_path / "no_such_model"), "--out",
                    str(tmp_path / "taken" / "images")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot create the output folder" in err, err  # not the missing model


def test_generate_twice_into_one_folder_keeps_both(pipeline_dir, tmp_path, capsys):
    flags = ["generate", "a red circle", "--model", pipeline_dir("sd1"), "--steps", "1", "--out", str(tmp_path)]
    capsys.readouterr()
    assert main.main(flags) == 0 and main.main(flags) == 0
    printed = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in printed] == ["image_000.png", "image_001.png"]
    assert sorted(os.listdir(tmp_path)) == ["image_000.png", "image_001.png"]


def test_an_unexpected_error_is_one_line_too(monkeypatch, pipeline_dir, tmp_path, capsys):
    import jaxdiff

    def broken(*args, **kwargs):
        raise RuntimeError("something deep\ninside XLA")

    monkeypatch.setattr(jaxdiff, "load", broken)
    rc = main.main(["generate", "x", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and err == "error: RuntimeError: something deep inside XLA (jaxdiff --verbose shows the traceback)\n"
    with pytest.raises(RuntimeError):
        main.main(["generate", "x", "--out", str(tmp_path), "--verbose"])
