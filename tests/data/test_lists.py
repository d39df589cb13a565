"""tools.data.lists, the official-data reader: what it accepts and each thing it rejects, with file and line; the
list writer and the count table."""
from __future__ import annotations

import unicodedata

import pytest

from tools.data.lists import MAX_ERRORS_SHOWN, class_counts, count_table, main, parse_list, read_list, write_list
from tools.fileio import DataError
from tools.task import LABELS


def write_raw(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def write_list_text(path, names):
    """names[i] with LABELS[i]."""
    return write_raw(path, "".join(f"{n}\t{label}\n" for n, label in zip(names, LABELS)))


def test_reads_train_list_with_bom_crlf_and_blanks(tmp_path, images):
    folder, names = images
    text = "\ufeff" + "".join(f"{n}\t{label}  \r\n" for n, label in zip(names, LABELS)) + "\r\n   \r\n"
    samples = read_list(write_raw(tmp_path / "train.txt", text), folder, labelled=True, progress=False)
    assert [s.name for s in samples] == names
    assert [s.label for s in samples] == list(LABELS)
    assert all(s.path.is_absolute() and s.path.exists() for s in samples)
    assert class_counts(samples) == {label: 1 for label in LABELS}


def test_test_list_with_and_without_labels(tmp_path, images):
    folder, names = images
    plain = read_list(write_raw(tmp_path / "B.txt", "\n".join(names) + "\n"), folder, labelled=None, progress=False)
    assert [s.label for s in plain] == [None] * 5
    with_labels = read_list(write_raw(tmp_path / "B2.txt", f"{names[0]}\t高风险\n"), folder, labelled=None,
                            progress=False)
    assert with_labels[0].label == "高风险"


def test_exact_duplicate_is_kept_once_with_a_warning_naming_both_lines(tmp_path, images, capsys):
    folder, names = images
    lst = write_raw(tmp_path / "train.txt", f"{names[0]}\t无风险\n{names[1]}\t高风险\n{names[0]}\t无风险\n")
    samples = read_list(lst, folder, labelled=True, progress=False)
    assert [s.name for s in samples] == names[:2] and samples[0].source == f"{lst}:1"  # kept at its first line
    assert capsys.readouterr().err == f"warning: {lst}:3: {names[0]} listed again (first on {lst}:1): kept once\n"
    # the unlabelled test list the same way: never dropped silently
    test = write_raw(tmp_path / "B.txt", f"{names[2]}\n{names[3]}\n{names[2]}\n{names[2]}\n")
    samples, errors, warnings = parse_list(test, folder, labelled=False)
    assert [s.name for s in samples] == [names[2], names[3]] and errors == []
    assert warnings == [f"{test}:3: {names[2]} listed again (first on {test}:1): kept once",
                        f"{test}:4: {names[2]} listed again (first on {test}:1): kept once"]


def test_many_repeats_are_summarised(tmp_path, images, capsys):
    folder, names = images
    lst = write_raw(tmp_path / "B.txt", "".join(f"{names[0]}\n" for _ in range(MAX_ERRORS_SHOWN + 4)))
    assert len(read_list(lst, folder, labelled=False, progress=False)) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == MAX_ERRORS_SHOWN + 1 and all(line.startswith("warning: ") for line in err)
    assert err[-1] == f"warning: ... and 3 more repeated names in {lst}"


def test_a_repeat_with_another_label_is_an_error_naming_both_lines(tmp_path, images):
    folder, names = images
    lst = write_raw(tmp_path / "B.txt", f"{names[0]}\t无风险\n{names[1]}\t中风险\n{names[0]}\t高风险\n")
    with pytest.raises(DataError) as err:
        read_list(lst, folder, labelled=None, progress=False)
    assert f"{lst}:3: {names[0]} listed again with label '高风险', but {lst}:1 says '无风险'" in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("a.jpg\t危险\n", "train.txt:1: unknown label '危险'"),
    ("a.jpg\t高风险\nb.jpg\n", "train.txt:2: expected <image>\\t<label>"),
    ("a.jpg\t高风险\n\nb.jpg\t中风险\na.jpg\t低风险\n", "train.txt:4: a.jpg listed again with label '低风险'"),
    ("a.jpg\t高风险\nmissing.jpg\t中风险\n", "train.txt:2: image not found"),
    ("../a.jpg\t高风险\n", "train.txt:1: invalid image name"),
    ("", "train.txt: no entries"),
])
def test_rejections_name_file_and_line(tmp_path, images, text, expected):
    folder, _ = images
    lst = write_raw(tmp_path / "train.txt", text)
    with pytest.raises(DataError) as err:
        read_list(lst, folder, labelled=True, progress=False)
    assert expected in str(err.value)


def test_corrupt_and_truncated_images_are_rejected(tmp_path, images):
    folder, names = images
    (folder / "garbage.jpg").write_bytes(b"not an image at all")
    good = (folder / names[0]).read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    lst = write_raw(tmp_path / "train.txt", "garbage.jpg\t无风险\ntruncated.jpg\t无风险\n")
    with pytest.raises(DataError) as err:
        read_list(lst, folder, labelled=True, progress=False)
    message = str(err.value)
    assert "train.txt:1: unreadable image" in message
    assert "train.txt:2: unreadable image" in message


def test_every_problem_is_reported_at_once(tmp_path, images):
    folder, _ = images
    lst = write_raw(tmp_path / "train.txt", "a.jpg\tX\nb.jpg\tY\nnope.jpg\t无风险\n")
    with pytest.raises(DataError) as err:
        read_list(lst, folder, labelled=True, progress=False)
    assert str(err.value).startswith("3 problem(s)")


def test_mixed_label_columns_rejected(tmp_path, images):
    folder, _ = images
    lst = write_raw(tmp_path / "B.txt", "a.jpg\t高风险\nb.jpg\n")
    with pytest.raises(DataError, match="some lines have a label column and some do not"):
        read_list(lst, folder, labelled=None, progress=False)


def test_not_utf8_rejected_with_line(tmp_path, images):
    folder, _ = images
    lst = write_raw(tmp_path / "train.txt", "a.jpg\t无风险\nb.jpg\t高风险\n", encoding="gbk")
    with pytest.raises(DataError, match=r"train.txt:1: not valid UTF-8"):
        read_list(lst, folder, labelled=True, progress=False)


def test_cli_exit_codes(tmp_path, images, capsys):
    folder, names = images
    good = write_raw(tmp_path / "ok.txt", f"{names[0]}\t无风险\n")
    bad = write_raw(tmp_path / "bad.txt", f"{names[0]}\t???\n")
    assert main(["--list", str(good), "--images", str(folder)]) == 0
    assert main(["--list", str(bad), "--images", str(folder)]) == 1
    assert "bad.txt:1: unknown label" in capsys.readouterr().err


def test_missing_list_file_is_named(tmp_path, images):
    folder, _ = images
    with pytest.raises(DataError, match=r"nope.txt: list file not found"):
        read_list(tmp_path / "nope.txt", folder, labelled=True, progress=False)


def test_write_list_is_read_back(tmp_path, images):
    folder, names = images
    samples = read_list(write_list_text(tmp_path / "in.txt", names), folder, labelled=True, progress=False)
    write_list(tmp_path / "out.txt", samples)
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "".join(
        f"{n}\t{label}\n" for n, label in zip(names, LABELS))
    again = read_list(tmp_path / "out.txt", folder, labelled=True, progress=False)
    assert [(s.name, s.path, s.label) for s in again] == [(s.name, s.path, s.label) for s in samples]
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary left


def test_count_table_has_a_column_per_list(tmp_path, images):
    folder, names = images
    samples = read_list(write_list_text(tmp_path / "in.txt", names), folder, labelled=True, progress=False)
    table = count_table({"train": samples, "val": samples[:2], "long column name": []}).splitlines()
    assert table[0].split() == ["label", "train", "val", "long", "column", "name"]
    assert [line.split() for line in table[1:-1]] == [[label, "1", "1" if i < 2 else "0", "0"]
                                                      for i, label in enumerate(LABELS)]
    assert table[-1].split() == ["total", "5", "2", "0"]
    # aligned on screen: a Chinese character takes two columns
    assert len({len(line) + sum(unicodedata.east_asian_width(c) == "W" for c in line) for line in table}) == 1
