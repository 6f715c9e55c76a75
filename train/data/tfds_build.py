"""Prepares local text files as a TFDS dataset that ``data.format=tfds`` reads, offline.

    python -m train.tfds_build --files 'data/shakespeare/*.txt' --val-files data/shakespeare/hamlet.txt \\
        --name shakespeare_text --data-dir ~/tensorflow_datasets
    python -m train data.format=tfds data.tfds_name=shakespeare_text data.tfds_data_dir=~/tensorflow_datasets

One record per document (per file, or per line with ``--format jsonl``), features
``{'text': Text}``, splits ``train`` and ``validation``, records in file order, written as
array_record (read without TensorFlow by ``tfds.data_source``) or, with
``--file-format tfrecord`` and TensorFlow installed, as TFRecord for ``data.tfds_reader=tf_data``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from collections.abc import Iterator

import tensorflow_datasets as tfds

from train.config.sections import ConfigError, DataConfig
from train.data.split import SplitKeys, train_val_split
from train.data.text import documents_in


class TextDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder named at run time over in-memory split -> documents; ``{'text': Text}`` records."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, name: str, splits: dict[str, list[str]], version: str, **kwargs):
        self.name = name  # the dataset's directory name under data_dir
        self.VERSION = tfds.core.Version(version)
        self.splits = splits
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Text documents prepared by python -m train.tfds_build ({self.name}).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # records keep file order
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(docs) for split, docs in self.splits.items()}

    def _generate_examples(self, docs) -> Iterator[tuple[int, dict]]:
        for i, text in enumerate(docs):  # empty documents are left out already, as the text path does
            yield i, {"text": text}


def build(
    name: str,
    data_dir: str,
    files: str,
    val_files: str = "",
    val_fraction: float = 0.05,
    format: str = "text",
    text_field: str = "text",
    version: str = "1.0.0",
    file_format: str = "array_record",
) -> dict[str, int]:
    """Writes ``data_dir/name/version``; returns records per split. ConfigError on bad input.

    ``val_files`` given: those documents are the validation split (and leave train). Otherwise
    ``val_fraction`` of whole documents is held out, by the split the training runs use
    (train/data/split.py).
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ConfigError(f"--name '{name}' is not a TFDS name; use lower_snake_case, e.g. my_corpus")
    target = os.path.join(data_dir, name, version)
    if os.path.exists(os.path.join(target, "dataset_info.json")):
        raise ConfigError(f"{target} already holds a prepared dataset; delete it or pass another --version")
    cfg = DataConfig(format=format, text_field=text_field)
    read = lambda paths: documents_in(paths, cfg)
    train, val = train_val_split(
        files, val_files, val_fraction, read, lambda d: d.name, SplitKeys("--files", "--val-files")
    )
    if not train:
        raise ConfigError(f"--files '{files}' leaves no training document; add files or narrow --val-files")
    splits = {split: [d.text for d in docs] for split, docs in (("train", train), ("validation", val)) if docs}
    if file_format == "tfrecord" and importlib.util.find_spec("tensorflow") is None:
        raise ConfigError("--file-format tfrecord needs TensorFlow; pip install -e '.[tf]' or write array_record")
    tfds.disable_progress_bar()
    builder = TextDocuments(name, splits, version, data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare()
    return {split: info.num_examples for split, info in builder.info.splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.tfds_build", description=__doc__.splitlines()[0])
    parser.add_argument("--files", required=True, help="glob(s) of documents, comma-separated")
    parser.add_argument("--val-files", default="", help="glob(s) of the validation documents (taken out of --files)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="without --val-files: share held out")
    parser.add_argument("--format", choices=["text", "jsonl"], default="text", help="a document per file or per line")
    parser.add_argument("--text-field", default="text", help="--format jsonl: the field holding the text")
    parser.add_argument("--name", required=True, help="dataset name: pass it as data.tfds_name")
    parser.add_argument("--data-dir", required=True, help="where to write: pass it as data.tfds_data_dir")
    parser.add_argument("--version", default="1.0.0", help="dataset version (a new one to rebuild)")
    parser.add_argument("--file-format", choices=["array_record", "tfrecord"], default="array_record")
    args = parser.parse_args(argv)
    data_dir = os.path.expanduser(args.data_dir)
    try:
        counts = build(
            args.name,
            data_dir,
            args.files,
            args.val_files,
            args.val_fraction,
            args.format,
            args.text_field,
            args.version,
            args.file_format,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {counts['train']} train / {counts.get('validation', 0)} validation documents to "
        f"{os.path.join(data_dir, args.name, args.version)}; train with data.format=tfds "
        f"data.tfds_name={args.name} data.tfds_data_dir={data_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
