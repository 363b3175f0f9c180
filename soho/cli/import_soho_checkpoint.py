r"""Import a checkpoint of the original SOHO release (github.com/researchmm/soho) as a soho checkpoint.

    python data_scripts/import_soho_checkpoint.py --checkpoint pretrained/epoch_40.pth \
        --tokenizer weights/bert-base-uncased --out weights/soho_release

Writes a save_pretrained directory (config.json, model.safetensors, the processor when --tokenizer is
given) and import_report.json: what was imported, what was not and why, what soho initialised afresh and
where soho computes differently from the release (soho/models/soho_release.py). The result is a start for
fine-tuning (init.checkpoint), not a reproduction of the release's outputs.

Release checkpoints are pickles. They are read with torch.load(weights_only=True), which refuses anything
but tensors and plain containers; a checkpoint storing other objects is read only with --trust-pickle,
which unpickles it fully and so runs whatever code the file names: use it only for a file you trust.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from soho.models.soho_release import import_release
from soho.tokenizer import load_tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the release's .pth (or a .safetensors of its state dict)")
    parser.add_argument("--out", required=True, help="the soho checkpoint directory to write")
    parser.add_argument("--tokenizer", default=None,
                        help="a local Hugging Face tokenizer directory (the release used bert-base-uncased); "
                             "fine-tuning needs the processor it makes")
    parser.add_argument("--num-attention-heads", type=int, default=None,
                        help="attention heads of the release's BERT (default: hidden size / 64, as BERT)")
    parser.add_argument("--max-text-length", type=int, default=40, help="the processor's token budget per text")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="fully unpickle a checkpoint that holds more than tensors: runs code the file names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        report = import_release(args.checkpoint, args.out, tokenizer, args.num_attention_heads, args.trust_pickle,
                                args.max_text_length)
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(json.dumps({"out": args.out, "imported": report["imported"], "not_imported": len(report["not_imported"]),
                      "initialised": len(report["initialised"]), "processor": report["processor"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
