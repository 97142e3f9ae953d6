"""The peft methods: QA-LoRA (qalora/) and QA-VeRA (qavera/), and the torch-only pieces they share."""
