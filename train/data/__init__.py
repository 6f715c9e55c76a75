"""What the loop trains on: one module per source, the objectives, the tasks, one pipeline, one split.

files.py        globs -> paths, UTF-8 text, JSONL rows (errors name the file and line)
split.py        the one train / validation split (val_files, or whole names held out by hash)
pipeline.py     the one grain pipeline: records -> this process's shuffled, endless, resumable batches
text.py         text documents (files or JSONL lines) -> packed token stream -> windows
examples.py     JSONL examples -> classification / seq2seq arrays
tagging.py      JSONL words + tags -> token-classification arrays (first sub-word labelled), predictions -> tags
conll.py        CoNLL column files -> tagged sentences (one tag scheme), their label set
windows.py      long sentences as overlapping windows, each word owned once; document context
tfds_source.py  TFDS datasets by name, array_record through tfds.data_source (no TensorFlow)
tfds_tf.py      TFDS datasets through tf.data (TFRecord; needs TensorFlow)
objectives.py   masked LM, span corruption, seq2seq and classification batches
packing.py      examples packed first-fit into rows with segment ids (grain), and predictions back
tasks.py        the loop's interface: batches, the objective's batch at a step, the held-out batches
                (train/evaluation/evaluators.py scores them)
tfds_build.py   python -m train.tfds_build: local text -> a TFDS dataset
genre.py        python -m train.genre: the Shakespeare genre classification data
speakers.py     python -m train.speakers: the plays' speaker names and stage directions as tagged words
bpe.py          python -m train.train_tokenizer: a byte-level BPE tokenizer trained on text files
"""
