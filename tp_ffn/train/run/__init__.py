"""The training run itself: :mod:`.trainer` (the loop) on :mod:`.parallelize` (process group, mesh,
FSDP2), :mod:`.optim`, :mod:`.metrics`, :mod:`.outputs` and :mod:`.preempt` (SIGTERM / SIGUSR1 end the
run after a saved step); and what is done with its checkpoints: :mod:`.generate` samples from one,
:mod:`.export` writes one as a Hugging Face / Meta directory."""
