"""Large alphabets: a 1,000-symbol charset (a dictionary file, as PaddleOCR and CnOCR write them) trains from
CnOCR-style labels (one space between symbols), exports to ONNX and reads alike."""

import shutil

import numpy as np
import pytest

import export_safe
import modelmeta
import reader
import synth
import train

cjk_font_needed = pytest.mark.skipif(not any(__import__("pathlib").Path(p).is_file() for p in synth.CJK_FONTS),
                                     reason="needs a CJK font: apt-get install fonts-wqy-microhei (.ci/run does)")


@cjk_font_needed
def test_a_thousand_symbol_charset_trains_from_spaced_labels_exports_to_onnx_and_reads_alike(tmp_path, capsys):
    symbols = synth.cjk_symbols(1000)
    drawn = synth.generate_synthetic(tmp_path / "drawn", 24, seed=9, symbols=symbols, length=4, style="cjk",
                                     workers=1, progress=False)
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, path in enumerate(drawn):  # numbered images, labels as CnOCR writes them: 624.jpg<TAB>降 飞 淀 惶
        shutil.copy(path, folder / f"{i}.png")
        rows.append(f"{i}.png\t{' '.join(path.stem)}\n")
    (tmp_path / "labels.tsv").write_text("".join(rows), encoding="utf-8")
    (tmp_path / "dict.txt").write_text("\n".join(symbols) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    assert train.main(["--data_dir", str(folder), "--labels", str(tmp_path / "labels.tsv"), "--charset",
                       str(tmp_path / "dict.txt"), "--preset", "tiny", "--init_from", "none", "--epochs", "1",
                       "--batch_size", "8", "--workers", "1", "--out", str(out)]) == 0
    assert "spaces: one space between symbols in 24 of 24 labels" in capsys.readouterr().out
    meta = modelmeta.read_meta(out / "crnn_ctc_best.keras")
    assert meta["charset"]["symbols"] == symbols and meta["max_len"] == 4 and meta["labels"]["spaces"] == "join"
    onnx = tmp_path / "model.onnx"
    assert export_safe.main(["--in_keras", str(out / "crnn_ctc_best.keras"), "--out_keras", str(onnx),
                             "--format", "onnx"]) == 0
    paths = sorted(folder.glob("*.png"))
    from_keras = reader.Reader(out / "crnn_ctc_best.keras")
    from_onnx = reader.Reader(onnx)
    images = np.stack([from_keras.prepare(p)[0] for p in paths])
    keras_probs = from_keras.network.predict_on_batch(images)
    assert keras_probs.shape[-1] == 1001  # 1,000 symbols and the blank
    np.testing.assert_allclose(from_onnx.network.predict_on_batch(images), keras_probs, atol=1e-4)
    assert [r.text for r in from_onnx.read_paths(paths)] == [r.text for r in from_keras.read_paths(paths)]


@cjk_font_needed
def test_a_runs_plots_draw_hanzi_with_the_installed_cjk_font(tmp_path):
    import warnings

    import plots

    log = tmp_path / "train_log.csv"
    log.write_text("epoch,loss,val_loss,val_exact_match,val_cer\n0,1.0,1.2,0.5,0.1\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = plots.write_run_plots(tmp_path, log, np.zeros((2, 50, 200, 1)), ["降飞淀惶", "山水火木"],
                                        ["降飞淀惶", "山水火水"])
    assert all(path.is_file() for path in written)
    assert not [w for w in caught if "missing from font" in str(w.message)]
