"""The uptrain console's eval line names the eval data so a user can tell which text it measured."""

from kvsurgeon.convert.train.console import eval_line

ROW = {"stage": "after uptraining", "step": 6, "tokens": 3072, "ppl": 20.0, "reference_ppl": 10.0, "kl": 0.5,
       "top1_agreement": 0.6, "eval_tokens": 1022}


def test_eval_line_names_a_local_file_by_its_name_and_a_hub_dataset_whole(tmp_path):
    f = tmp_path / "valid.jsonl"
    f.write_text('{"text": "x"}\n')
    head = "eval after uptraining (step 6, 3,072 tokens trained): ppl 20.000, the source 10.000 (2.00x), KL 0.5000, top-1 agreement 60.0%"
    assert eval_line(ROW, f) == head + " on 1,022 held-out tokens of valid.jsonl"
    # not a file here: a Hub dataset id, whose last part alone would name another dataset
    assert eval_line(ROW, "someorg/some-dataset") == head + " on 1,022 held-out tokens of someorg/some-dataset"
    assert eval_line(ROW) == head + " on 1,022 held-out tokens"
