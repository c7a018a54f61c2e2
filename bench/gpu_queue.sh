#!/usr/bin/env bash
# GPU runs of the pot3-a8 work (issue 15) and the session-39 GPU tests, in device calls of at most
# 600 s each. Each step's log goes to $OUT/<part>/<step>.log; $OUT/<part>.tgz is rewritten after every
# step, so a call cut short still returns what it finished. Session 39 (H100) ran pot and bench,
# and model's tests by pytest directly (docs/KERNELS-HISTORY.md); session 40 (H100) smollm2, pot, bench and
# prefill (bench/results/2026-12-05-pot3-a8-prefill-h100.md); ncu is prepared, not yet run.
#   prefill: the fp16-Ŵ path's GPU tests, the 7B e2e and prefill_breakdown of 512 tokens.
#   ncu    : bench/gate_up_one.py, then its two SiLU GEMVs under Nsight Compute.
#   tests  : the pot3-a8 GPU tests (the resid epilogue bit-exact, o and down adding into h at 20
#            tokens; Ŵ in fp16 bit-exact, the fp16-Ŵ GEMM within an ulp of the GEMV, a 40-token
#            prefill through it), cuBLAS's fp32 output, the model tests (with the 7B-width decode at
#            issue 19's contexts), the A8W4 GEMM at issue 20's shapes (odd N, M to 8192) and decode
#            attention at batch 32 past 1000 positions. Carry .carry/cupy-cache.
#            `pot` runs only the first half (pot3-a8 and cuBLAS), `model` the rest, so that
#            `pot` and `bench` fit one call.
#   bench  : the 7B W3-PoT x INT8 decode with the residual fold (issue 15: 1.13x A8W4 before, 1.17x
#            with it, H100), batch 8 and its 512-token prefill through the fp16-Ŵ GEMM, and as
#            A/Bs RB = 4 for K <= 8192, the GEMV up to 4 tokens only and
#            the GEMV at every M (the prefill as before). Carry .carry/cupy-cache.
#   smollm2: GPU against CPU perplexity of the vocabulary-pruned SmolLM2 with W3-PoT x INT8 layers
#            (issue 15). Carry .carry/smollm2-pa8 alone (45 MiB: the cupy cache does not fit beside
#            it), made here by `python bench/pruned_compare.py build --model smollm2 --recipe
#            pot3-a8 --out .carry/smollm2-pa8`; CPU perplexity 28.2157, 28.2686 with fp16 storage.
set -u
part=${1:?usage: bash bench/gpu_queue.sh tests|pot|model|bench|smollm2|prefill|ncu|tokx|p512|attn42|trips|b32}
out=${OUT:-/tmp/out}/$part
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$PWD/.carry/cupy-cache}

step() {            # step NAME SECONDS COMMAND...
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$out/$name.log" 2>&1
    echo "$name rc=$? $((SECONDS - t0))s" | tee -a "$out/steps.txt"
    (cd "$out/.." && tar czf "$part.tgz" "$part")
}

case $part in
tests|pot|model)     # pot and model are the two halves of tests
    nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv >"$out/gpu.txt" 2>&1
    [ "$part" = model ] ||
        step pot_a8_gpu 150 python -m pytest -q -p no:cacheprovider tests/test_pot_a8_gpu.py tests/test_cublas_gpu.py
    [ "$part" = pot ] ||
        step model_cuda 330 python -m pytest -q -p no:cacheprovider tests/test_model_cuda.py
    [ "$part" = pot ] ||
        step gemm_any_shape 120 python -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py -k any_shape
    [ "$part" = pot ] ||
        step attn_b32_1024 120 python -m pytest -q -p no:cacheprovider tests/test_decode_attention_gpu.py -k b32-1024
    ;;
bench)
    step e2e_pot3a8 400 python -m engine.bench e2e --models llama7b --quick --pot-bits 3a8 \
        --ab wb.pa8_rb4_max_k=8192 --ab wb.pa8_gemv_max_m=4 --ab wb.pa8_gemv_max_m=1000000 --json
    ;;
smollm2)
    step compare 400 python bench/pruned_compare.py compare --dir .carry/smollm2-pa8
    ;;
prefill)             # session 40: the fp16-Ŵ path's kernels vectorized (the dequantization by prmt and
                     # f16x2 multiplies), its GPU tests, the 7B prefill of 512 and where it goes.
                     # Carry .carry/cupy-cache.
    step pot_a8_gpu 150 python -m pytest -q -p no:cacheprovider tests/test_pot_a8_gpu.py
    step e2e_prefill 240 python -m engine.bench e2e --models llama7b --quick --pot-bits 3a8 --json
    step prefill_pb 150 python bench/prefill_breakdown.py --tokens 512 --paths fp16,pot3a8
    ;;
ncu)                 # issue 15's last few % of decode: the two gate|up SiLU GEMVs alone, timed, then under
                     # Nsight Compute (Firecracker machines: KINDS.md). Carry .carry/cupy-cache.
    step gate_up 120 python bench/gate_up_one.py
    for kern in gemm_a8w4_gemv gemv_pot3_a8; do
        step "ncu_$kern" 200 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
            --section WarpStateStats --section Occupancy --section LaunchStats -k "regex:$kern" -s 3 -c 2 \
            python bench/gate_up_one.py --qkv 0 --reps 2
    done
    ;;
tokx)                # session 41: several tokens along the GEMV's grid x (WB_TUNE.pa8_tok_x) and MT tokens a
                     # block (WB_TUNE.pa8_mt): the GPU tests, then batched decode under each setting
                     # (bench/pa8_batches.py DEFAULT_SETTINGS), beside A8W4. Carry .carry/cupy-cache.
    step pot_a8_gpu 200 python -m pytest -q -p no:cacheprovider tests/test_pot_a8_gpu.py
    step batches 300 python bench/pa8_batches.py --batches 2,8,16
    ;;
p512)                # session 42, issue 20's 512-token prefill (1.27-1.30x FP16, bar 1.3x): the wgmma tiles of its
                     # four linears timed alone, where its time goes, and the e2e prefill with N = 4096 at 512
                     # tokens on the few-tile configuration (wgmma_few_tiles 64 -> 65). Carry .carry/cupy-cache.
    step tune512 200 python -m engine.bench gemm-tune --cases 512:4096:4096,512:11008:4096,512:4096:12288,512:4096:22016 \
        --tiles 256/4/2/0/2,128/4/1/0/2,128/4/2/0/2,64/4/1/0/2,64/4/2/0/2 --reps 30
    step breakdown512 120 python bench/prefill_breakdown.py --tokens 512 --paths a8w4,fp16
    step e2e_few 250 python -m engine.bench e2e --models llama7b --quick --pot-bits '' --ab wgmma_few_tiles=65 --json
    ;;
attn42)              # session 42, the decode step's attention (issue 19): the new token's q, k and v rows in one
                     # round trip, the merges' peer loads in one, no store before a cluster barrier; against the
                     # kernels before (bench/patches/attn-s42-before.json) in one process. The landed form
                     # (ac2d5f5) ran in session 43 (bench/results/2026-12-05-session43-h100.md §1). Carry
                     # .carry/cupy-cache.
    step attn_gpu 240 python -m pytest -q -p no:cacheprovider tests/test_decode_attention_gpu.py tests/test_rows_gpu.py
    step e2e_ctx 300 python -m engine.bench e2e --models llama7b --context 128,1024 --batches 1,32 --pot-bits '' \
        --patch bench/patches/attn-s42-before.json --json
    step model_cuda 330 python -m pytest -q -p no:cacheprovider tests/test_model_cuda.py
    ;;
trips)               # session 42's wip/decode-trips, merged after its session-43 run (§2 there): quant_amax
                     # loads the absmax with the row's values (one round trip after the PDL wait, not two; a static scale before the wait), and
                     # attn_decode_gqa's last block loads every partial it merges at once (one round trip, not
                     # four). The row-kernel, attention and model GPU tests, then the 7B step at 128 and 2048
                     # positions against the kernels before (bench/patches/decode-trips-before.json). Carry
                     # .carry/cupy-cache.
    step gpu_tests 240 python -m pytest -q -p no:cacheprovider tests/test_rows_gpu.py tests/test_hostile_gpu.py \
        tests/test_decode_attention_gpu.py
    step e2e_ab 240 python -m engine.bench e2e --models llama7b --context 128,2048 --batches 1,8 --pot-bits '' \
        --patch bench/patches/decode-trips-before.json --json
    step model_cuda 330 python -m pytest -q -p no:cacheprovider tests/test_model_cuda.py tests/test_pot_a8_gpu.py
    ;;
b32)                 # session 44, issues 19 and 20 at batch 32: what the batch-32 step at 1024 positions spends
                     # per kind of launch (each left out of the captured step, outputs wrong, timing only),
                     # fp16 K/V. In session 43 (H100) that step ran at 64 % of its bytes roofline with INT8
                     # K/V (4897 of 7668 tok/s) while attention ran at 80 %: the M = 32 GEMMs are the
                     # suspects (alone, H200 tuning data of 2026-12-03: 0.6-1.6 TB/s of 4.25).
                     # Then each 7B linear at M = 32 alone under the engine's pick, the mma.sync kernel and the
                     # GEMV, and the pick for gate|up under Nsight Compute. Carry .carry/cupy-cache.
    step ablate 300 python bench/profile_decode.py --batch 32 --ctx 1024 --steps 16 --ablate
    for nk in "12288 4096" "4096 4096" "22016 4096" "4096 11008"; do
        set -- $nk
        for kern in auto mma gemv; do
            step "one_${1}x${2}_$kern" 60 python -m engine.bench gemm-one --m 32 --n "$1" --k "$2" --kernel "$kern"
        done
    done
    step ncu_gate_up 200 ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section WarpStateStats --section Occupancy --section LaunchStats -k "regex:gemm_a8w4" -s 3 -c 1 \
        python -m engine.bench gemm-one --m 32 --n 22016 --k 4096 --kernel auto --reps 5
    ;;
*)
    echo "unknown part $part: tests, pot, model, bench, smollm2, prefill, ncu, tokx, p512, attn42, trips or b32" >&2
    exit 2
    ;;
esac
