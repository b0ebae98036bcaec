"""Datasets: embedded ones, MedMNIST-layout .npz and .csv files, and clear refusals."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from fedpriv.data import load_dataset
from fedpriv.errors import DataError


def test_embedded_datasets() -> None:
    cancer = load_dataset("breast-cancer")
    assert cancer.features.shape == (569, 30) and cancer.features.dtype == np.float32
    assert cancer.num_classes == 2 and cancer.kind == "tabular"
    digits = load_dataset("digits")
    assert digits.features.shape == (1797, 1, 8, 8)
    assert digits.features.min() >= 0.0 and digits.features.max() <= 1.0
    assert digits.num_classes == 10 and digits.kind == "image"


def test_feature_names_in_model_order() -> None:
    from sklearn.datasets import load_breast_cancer

    cancer = load_dataset("breast-cancer")
    bunch = load_breast_cancer()
    assert cancer.feature_names == tuple(bunch.feature_names)
    # column i of the model's input is the named column, scaled by the schema's public
    # reference centre and scale (the public dataset's published mean and deviation)
    raw = bunch.data[:, 7]
    feature = cancer.schema.features[7]
    assert feature.name == "mean concave points" and feature.scale
    assert np.allclose(cancer.features[:, 7], (raw - feature.centre) / feature.scale, atol=1e-6)
    digits = load_dataset("digits")
    assert len(digits.feature_names) == 64 and digits.feature_names[9] == "pixel_1_1"


def _medmnist(path: Path, *, rgb: bool = False, drop: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 5), ("test", 7)):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 4, size=(n, 1))
    arrays["train_labels"][0, 0] = 3  # make sure the largest class appears
    if drop:
        del arrays[drop]
    np.savez(path, **arrays)
    return path


def test_npz_in_medmnist_layout(tmp_path: Path) -> None:
    data = load_dataset(str(_medmnist(tmp_path / "organ.npz")))
    assert data.features.shape == (32, 1, 28, 28)
    assert data.features.max() <= 1.0
    assert data.labels.shape == (32,) and data.num_classes == 4
    # the file's own test split is kept as the central test split, at the end of the index space
    assert data.test_indices is not None and data.test_indices.tolist() == list(range(25, 32))


def test_npz_rgb_is_channels_first(tmp_path: Path) -> None:
    data = load_dataset(str(_medmnist(tmp_path / "rgb.npz", rgb=True)))
    assert data.features.shape == (32, 3, 28, 28)


def test_npz_without_expected_keys(tmp_path: Path) -> None:
    path = _medmnist(tmp_path / "broken.npz", drop="val_labels")
    with pytest.raises(DataError, match="lacks val_labels"):
        load_dataset(str(path))


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_dataset(str(path))


def test_csv_with_label_and_site(tmp_path: Path) -> None:
    path = tmp_path / "patients.csv"
    path.write_text("age,bp,site,label\n50,120,A,yes\n61,130,B,no\n45,110,A,no\n70,150,B,yes\n")
    data = load_dataset(str(path))
    assert data.features.shape == (4, 2)
    assert data.labels.tolist() == [1, 0, 0, 1]  # classes sorted: no=0, yes=1
    assert data.sites is not None and data.sites.tolist() == ["A", "B", "A", "B"]
    assert data.feature_names == ("age", "bp")  # the label and site columns are not features


def test_label_codes_are_the_same_in_every_process(tmp_path: Path) -> None:
    """ "1" and "1.0" tie in the natural order; the class order must not follow the hash seed
    (set iteration), or two processes would map the same label to different indices."""
    import subprocess
    import sys

    path = tmp_path / "labels.csv"
    path.write_text("age,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(["1.0", "0", "1"])))
    script = (
        "import sys; from fedpriv.data import load_dataset; "
        f"print(load_dataset({str(path)!r}).labels.tolist())"
    )
    seen = set()
    for seed in ("1", "2", "3", "4", "5", "6"):
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**__import__("os").environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-1000:]
        seen.add(done.stdout.strip())
    assert seen == {"[2, 0, 1]"}  # 0 < "1" < "1.0": equal values, then by text


def test_values_near_the_float_limit_standardise_without_overflow(tmp_path: Path) -> None:
    """A column summed as it is overflows to inf near 1e308 (every feature then NaN, with
    only a RuntimeWarning); per-file standardisation must give what it gives at small scale."""
    path = tmp_path / "huge.csv"
    rows = [(1e308, 1.0, 0), (-1e308, 2.0, 1), (5e307, 3.0, 0), (0.0, 4.0, 1)]
    path.write_text("big,small,label\n" + "".join(f"{a!r},{b},{y}\n" for a, b, y in rows))
    small = tmp_path / "small.csv"
    small.write_text("big,small,label\n" + "".join(f"{a / 1e300!r},{b},{y}\n" for a, b, y in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        huge = load_dataset(str(path))
    assert np.isfinite(huge.features).all()
    np.testing.assert_allclose(huge.features, load_dataset(str(small)).features, atol=1e-6)


def test_csv_without_label_column(tmp_path: Path) -> None:
    path = tmp_path / "nolabel.csv"
    path.write_text("age,bp\n50,120\n")
    with pytest.raises(DataError, match=r"no label column 'label'.*--label-column"):
        load_dataset(str(path))


def test_csv_with_text_feature(tmp_path: Path) -> None:
    path = tmp_path / "text.csv"
    path.write_text("age,sex,label\n50,F,1\n")
    with pytest.raises(DataError, match="line 2: column 'sex' holds 'F'"):
        load_dataset(str(path))


def test_missing_file_and_unknown_name() -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("/no/such/file.csv")
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_csv_cells_are_read_as_python_reads_them_and_errors_name_the_line(
    tmp_path: Path,
) -> None:
    """The CSV is converted column by column: every cell is the float Python makes of it,
    and a bad cell, a short row or an empty patient id is reported on its own line."""
    path = tmp_path / "cells.csv"
    cells = [[" 1.5", "-0", "1e3"], ["-2E-1 ", "+3", ".5"], ["5.", "1_000", "\t2"]]
    path.write_text("a,b,c,label\n" + "".join(",".join(r) + ",0\n" for r in cells))
    data = load_dataset(str(path))
    assert data.raw_features is not None
    np.testing.assert_array_equal(
        data.raw_features, np.array([[float(v) for v in row] for row in cells])
    )
    # Python's float() reads "nan" and "inf": a missing value must not become a feature
    for missing in ("nan", "-Inf", "NaN"):
        path.write_text(f"a,b,label\n1,2,0\n3,{missing},1\n")
        with pytest.raises(DataError, match=f"line 3: column 'b' holds '{missing}', not a finite"):
            load_dataset(str(path))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,0\n3,4,1\n5,x7,0\n")
    with pytest.raises(DataError, match=r"line 4: column 'b' holds 'x7', not a number"):
        load_dataset(str(bad))
    short = tmp_path / "short.csv"
    short.write_text("a,b,label\n1,2,0\n3,1\n")
    with pytest.raises(DataError, match="line 3: 2 fields, the header has 3"):
        load_dataset(str(short))
    patients = tmp_path / "patients.csv"
    patients.write_text("pid,a,label\np1,1,0\np2,2,1\n ,3,0\n")
    with pytest.raises(DataError, match=r"line 4: the patient column 'pid' is empty"):
        load_dataset(str(patients), patient_column="pid")


@pytest.mark.parametrize(
    "text",
    [
        "a,b,label\n1,2,0\n3,4,1\n",
        "a,b,label\n1,2,0\n3,4,1",  # no final newline
        "a,b,label\r\n1,2,0\r\n3,4,1\r\n",
        'a,b,label\n"1",2,0\n3,"4,5",1\n',  # quotes: csv.reader's way
        "a,b,label\n1,2,0\n\n3,4,1\n",  # a blank line
        "a,b,label\n1,2,0\n3,4,1\n\n",
        "a,b,label\n1,2,0,9\n3,4,1\n",  # a record with a field too many
        "a,b,label\n1,2,0\n3,4\n",
        "a,b,label\n 1, 2,0\n1,,1\n",
        "a,b,label\n1,2,0\r3,4,1\n",  # a lone carriage return
        "a,b,label\n",
        "",
    ],
)
def test_the_quick_split_reads_what_csv_reader_reads(text: str) -> None:
    import csv
    import io

    from fedpriv.data.datasets import _cells

    header, columns, count = _cells(text)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    expected_header, records = (rows[0], rows[1:]) if rows else ([], [])
    assert header == expected_header
    wrong = [(r, len(row)) for r, row in enumerate(records, start=2) if len(row) != len(header)]
    if wrong:
        assert (columns, count) == wrong[0]
    else:
        assert count == len(records)
        assert columns == [[row[i] for row in records] for i in range(len(header))]


# Cells Python's float() reads, some in ways a faster parser might not: whitespace
# (Unicode's too), signs, exponents, underscores between digits, digits of other scripts,
# very long numbers, and numbers beyond float64's range on the small side. (None near its
# large end: the file's own standardisation sums each column.)
_AWKWARD_NUMBERS = (
    *("0", "-0", "+0", "1.5", " 1.5 ", "\t2", "3\t", "\xa07", "+.5", "-.25", "5.", "00012"),
    *("1e3", "-2E-1", "1E+3", "1e-400", "4.9e-324", "-2.5e-324", "1e22", "1_000"),
    *("1_0.2_5", "\u0661\u0662", "\uff11", "0." + "1" * 400, "0" * 300 + "1", "9" * 30),
    *("0.1256999969482422", "-0.13210000097751617", "123456789012345678901234567890"),
)
# Cells float() refuses ("not a number") or reads as nan or inf ("not a finite number").
_NOT_NUMBERS = ("", " ", "x7", "1e", "1.2.3", "+-1", "0x10", "1d3", "1__0", "_1", "1_", "1\x00")
_NOT_FINITE = ("nan", "NaN", "-nan", "inf", "-Inf", "infinity", "1e400", "-1e400", "9" * 400)


def _awkward_table(rng: np.random.Generator, rows: int, columns: int) -> list[list[str]]:
    picks = rng.integers(len(_AWKWARD_NUMBERS), size=(rows, columns))
    return [[_AWKWARD_NUMBERS[i] for i in row] for row in picks]


def _write(path: Path, names: list[str], table: list[list[str]], *, quoted: bool) -> None:
    def field(cell: str) -> str:
        return '"' + cell + '"' if quoted else cell

    lines = [",".join(names)] + [
        ",".join(map(field, row)) + f",{r % 2}" for r, row in enumerate(table)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("quoted", [False, True], ids=["plain split", "csv.reader"])
def test_every_numeric_cell_is_what_float_makes_of_it(tmp_path: Path, quoted: bool) -> None:
    """A table of awkward cells, read by either of the CSV's two splits: the features are,
    bit for bit (-0.0 too), what Python's float() makes of each cell; the reference any
    faster parser of the columns must match."""
    from fedpriv.data.datasets import load_raw

    rng = np.random.default_rng(14)
    table = _awkward_table(rng, rows=400, columns=5)
    names = [f"c{i}" for i in range(5)]
    path = tmp_path / "awkward.csv"
    _write(path, [*names, "label"], table, quoted=quoted)
    data = load_raw(str(path))
    expected = np.array([[float(cell) for cell in row] for row in table], dtype=np.float64)
    assert data.raw_features is not None and data.raw_features.tobytes() == expected.tobytes()
    assert data.feature_names == tuple(names)


@pytest.mark.parametrize("quoted", [False, True], ids=["plain split", "csv.reader"])
def test_a_bad_or_missing_cell_is_named_by_line_and_column(tmp_path: Path, quoted: bool) -> None:
    """Each cell float() refuses, or reads as nan or inf, put in a table of awkward numbers:
    one line naming the cell's line, column and text; in a column holding both kinds, the
    cell float() refuses is the one named, wherever the missing one is."""
    from fedpriv.data.datasets import load_raw

    rng = np.random.default_rng(15)
    names = ["a", "b", "c"]
    for n, cell in enumerate((*_NOT_NUMBERS, *_NOT_FINITE)):
        table = _awkward_table(rng, rows=30, columns=3)
        r, c = int(rng.integers(30)), int(rng.integers(3))
        table[r][c] = cell
        path = tmp_path / f"bad{n}.csv"
        _write(path, [*names, "label"], table, quoted=quoted)
        what = "a number" if cell in _NOT_NUMBERS else "a finite number"
        with pytest.raises(DataError) as caught:
            load_raw(str(path))
        assert str(caught.value).startswith(
            f"'{path}' line {r + 2}: column '{names[c]}' holds {cell!r}, not {what};"
        ), (cell, str(caught.value))
    table = _awkward_table(rng, rows=30, columns=3)
    table[3][1], table[20][1] = "nan", "x7"
    _write(path, [*names, "label"], table, quoted=quoted)
    with pytest.raises(DataError, match=r"line 22: column 'b' holds 'x7', not a number;"):
        load_raw(str(path))


def test_the_one_pass_parse_reads_a_cell_as_float_does_or_leaves_it() -> None:
    """The plain table's one-pass parse (numpy's, in C) against float() on every cell of up
    to five characters from the characters it takes, and of up to four with whitespace,
    underscores and letters besides: it reads the cell to float()'s very value, or it
    gives the table back (None) to be read cell by cell; and it takes every cell of its
    characters that float() reads."""
    import itertools

    from fedpriv.data.datasets import _NUMBER_BYTES, _numbers

    def cells(alphabet: str, longest: int) -> list[str]:
        return [
            "".join(chars)
            for n in range(1, longest + 1)
            for chars in itertools.product(alphabet, repeat=n)
        ]

    taken = 0
    for cell in cells("05.eE+-", 5) + cells("1.e-_ \tnaifx", 4):
        parsed = _numbers([cell], 1)
        try:
            want = float(cell)
        except ValueError:
            assert parsed is None, cell
            continue
        if parsed is None:
            assert not set(cell) <= set(_NUMBER_BYTES.decode()), cell
            continue
        assert parsed.shape == (1, 1) and parsed.tobytes() == np.float64(want).tobytes(), cell
        taken += 1
    assert taken > 800  # the numbers among the cells of its characters (862)


def test_an_all_number_table_is_parsed_in_one_pass_as_float_reads_it(tmp_path: Path) -> None:
    """A file of numbers only (signs, exponents, long mantissas, below float64's range;
    none near its top: the file's own standardisation sums each column) goes the one-pass
    way, and its features are float()'s bit for bit; a cell out of range, or one that is
    no number, is named as the cell-by-cell way names it; the label keeps its text."""
    from fedpriv.data.datasets import _cells, _split_plain, _table, load_raw

    rng = np.random.default_rng(16)
    digits = rng.integers(0, 25, size=600)
    mantissas = [f"{x:.{d}f}" for x, d in zip(rng.normal(size=600), digits, strict=True)]
    exponents = rng.integers(-330, 150, size=600)
    pool = [
        *(m if e % 3 else f"{m}e{e}" for m, e in zip(mantissas, exponents, strict=True)),
        *("-0", "+0", "+.5", "5.", "1E+3", "-2e-1", "1e-400", "4.9e-324", "2.4e-324"),
        *("123456789012345678901234567890", "0." + "1" * 300, "0" * 50 + "7", "-9"),
    ]
    table = [[pool[i] for i in row] for row in rng.integers(len(pool), size=(500, 4))]
    for row in table:
        row.append(("0", "1", "10")[int(rng.integers(3))])
    names = ["a", "b", "c", "d", "label"]
    text = ",".join(names) + "\n" + "".join(",".join(row) + "\n" for row in table)
    _, columns, count, numbers = _table(text)
    assert numbers is not None and numbers.shape == (500, 5) and count == 500
    assert [columns[i] for i in range(5)] == _split_plain(text.split("\n")[1:-1], 5)
    for ends_empty in ("a,label\n1,0\n2,\n", "a,label\n1,0\n2,"):  # numpy drops a last ","
        assert _table(ends_empty) == (*_cells(ends_empty), None)
    path = tmp_path / "numbers.csv"
    path.write_text(text)
    data = load_raw(str(path))
    expected = np.array([[float(cell) for cell in row[:4]] for row in table], dtype=np.float64)
    assert data.raw_features is not None and data.raw_features.tobytes() == expected.tobytes()
    assert data.class_names == ("0", "1", "10")
    assert data.labels.tolist() == [("0", "1", "10").index(row[4]) for row in table]
    bad_cells = [("1e400", "a finite number"), ("-1e999", "a finite number")]
    bad_cells += [(cell, "a number") for cell in ("1e", "", "-", "1.2.3", "+-1")]
    for n, (cell, what) in enumerate(bad_cells):
        r, c = int(rng.integers(500)), int(rng.integers(4))
        bad = [row.copy() for row in table]
        bad[r][c] = cell
        path = tmp_path / f"bad{n}.csv"
        path.write_text(",".join(names) + "\n" + "".join(",".join(row) + "\n" for row in bad))
        with pytest.raises(DataError) as caught:
            load_raw(str(path))
        assert str(caught.value).startswith(
            f"'{path}' line {r + 2}: column '{names[c]}' holds {cell!r}, not {what};"
        ), (cell, str(caught.value))


@pytest.mark.parametrize("width", [1, 2, 3, 6])
def test_a_column_split_from_its_lines_is_the_split_tables(width: int) -> None:
    from fedpriv.data.datasets import _LineColumns, _split_plain

    lines = [",".join(f"{r}.{i}" if (r + i) % 4 else "" for i in range(width)) for r in range(9)]
    by_line = _LineColumns(lines, width)
    assert [by_line[i] for i in range(width)] == _split_plain(lines, width)
