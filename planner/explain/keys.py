"""The readers' key tables: `KEYMAP` inverted per trainer, the extra keys no writer writes, the
type of every setting, and the keys known to change nothing the estimate counts.

Part of the readers (`planner.explain.readers`), beside the writers' key map they invert.
"""

from __future__ import annotations

from planner.writers.keymap import KEYMAP

AUTO = "auto"
"""HF Trainer's placeholder in a DeepSpeed JSON: filled from the trainer arguments or the model."""

DS_KEYS = {k.deepspeed: k.setting for k in KEYMAP if k.deepspeed}
DS_AUTO = frozenset(k.setting for k in KEYMAP if k.deepspeed and k.auto)
HF_KEYS = {k.hf: k.setting for k in KEYMAP if k.hf}
LF_KEYS = {k.llamafactory: k.setting for k in KEYMAP if k.llamafactory}
MINICPM_KEYS = {k.minicpm: k.setting for k in KEYMAP if k.minicpm}

HF_EXTRA = {
    # transformers 5 renamed gradient checkpointing; 4.x scripts still say warmup_ratio
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
    "gradient_checkpointing": "gradient_checkpointing",
    "gradient_checkpointing_kwargs": "gradient_checkpointing_kwargs",
    "warmup_ratio": "warmup_ratio",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
}
MINICPM_EXTRA = {"llm_type": "llm_type", "q_lora": "q_lora", "lora_layers_to_transform": "lora_layers_to_transform"}
LF_EXTRA = {
    "image_max_pixels": "image_max_pixels",
    "freeze_trainable_layers": "freeze_trainable_layers",
    "quantization_bit": "quantization_bit",
    "stage": "lf_stage",
    "template": "template",
}

BOOL_SETTINGS = frozenset({
    "bf16", "fp16", "pure_bf16", "bf16_master_weights_and_grads", "bf16_optimizer_states", "gradient_checkpointing",
    "disable_gradient_checkpointing", "offload_optimizer_pin_memory", "offload_param_pin_memory", "overlap_comm",
    "contiguous_gradients", "stage3_gather_16bit_weights_on_model_save", "remove_unused_columns", "use_lora",
    "tune_vision", "tune_llm", "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "q_lora",
})
INT_SETTINGS = frozenset({
    "micro_batch", "grad_accum", "global_batch", "seq_len", "max_slice_nums", "zero_stage", "reduce_bucket_size",
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
    "stage3_max_reuse_distance", "sub_group_size", "max_steps", "save_steps", "save_total_limit", "seed", "lora_rank",
    "lora_alpha", "nproc_per_node", "nnodes", "world_size", "image_max_pixels", "freeze_trainable_layers",
    "quantization_bit",
})
FLOAT_SETTINGS = frozenset({
    "learning_rate", "adam_epsilon", "weight_decay", "max_grad_norm", "warmup_ratio", "num_train_epochs",
    "lora_dropout", "logging_steps", "adam_beta1", "adam_beta2",
})

DS_IGNORED = (
    "fp16.", "bf16.immediate_grad_update", "bf16.check_grad_overflow", "scheduler.", "optimizer.params.",
    "steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "zero_optimization.allgather_partitions", "zero_optimization.allgather_bucket_size",
    "zero_optimization.reduce_scatter", "zero_optimization.round_robin_gradients",
    "zero_optimization.ignore_unused_parameters", "zero_optimization.stage3_gather_fp16_weights_on_model_save",
    "zero_optimization.offload_optimizer.buffer_count", "zero_optimization.offload_optimizer.fast_init",
    "zero_optimization.offload_optimizer.pipeline", "zero_optimization.offload_param.buffer_count",
    "zero_optimization.offload_param.buffer_size", "zero_optimization.offload_param.max_in_cpu",
    "prescale_gradients", "gradient_predivide_factor", "communication_data_type", "checkpoint.", "aio.",
    "flops_profiler.", "tensorboard.", "wandb.", "csv_monitor.", "comms_logger.", "activation_checkpointing.",
    "dump_state", "seed",
)
"""DeepSpeed keys (prefixes) known to change nothing the estimate counts: loss scaling, the
scheduler, logging, checkpoint I/O. DeepSpeed's own ``activation_checkpointing`` block acts only
through its checkpoint API, which HF models do not call."""

HF_IGNORED = frozenset((
    "output_dir overwrite_output_dir lr_scheduler_kwargs optim_args adam_epsilon average_tokens_across_devices "
    "bf16_full_eval fp16_full_eval tf32 use_cache torch_empty_cache_steps logging_strategy logging_first_step "
    "logging_dir log_on_each_node logging_nan_inf_filter include_num_input_tokens_seen log_level log_level_replica "
    "disable_tqdm report_to run_name project eval_strategy evaluation_strategy eval_steps eval_delay "
    "per_device_eval_batch_size prediction_loss_only eval_on_start eval_do_concat_batches eval_use_gather_object "
    "include_for_metrics batch_eval_metrics save_only_model save_strategy save_steps save_on_each_node "
    "save_total_limit enable_jit_checkpoint push_to_hub hub_token hub_private_repo hub_model_id hub_strategy "
    "hub_always_push hub_revision load_best_model_at_end metric_for_best_model greater_is_better ignore_data_skip "
    "restore_callback_states_from_checkpoint full_determinism seed data_seed use_cpu accelerator_config "
    "dataloader_drop_last dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers "
    "dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order remove_unused_columns "
    "label_names train_sampling_strategy length_column_name ddp_find_unused_parameters ddp_broadcast_buffers "
    "ddp_static_graph ddp_backend ddp_timeout debug skip_memory_metrics do_train do_eval do_predict "
    "resume_from_checkpoint local_rank learning_rate lr_scheduler_type warmup_steps warmup_ratio num_train_epochs "
    "max_steps logging_steps weight_decay max_grad_norm parallelism_config neftune_noise_alpha"
).split())
"""``TrainingArguments`` fields (transformers 5.24, and 4.x names scripts still use) that change
nothing the estimate counts."""

HF_UNMODELLED = frozenset((
    "torch_compile torch_compile_backend torch_compile_mode use_liger_kernel liger_kernel_config fsdp fsdp_config "
    "ddp_bucket_cap_mb label_smoothing_factor optim_target_modules eval_accumulation_steps auto_find_batch_size"
).split())
"""Fields that do change memory in ways the estimate does not model: named when set."""

MINICPM_IGNORED = frozenset(
    "data_path eval_data_path cache_dir lora_weight_path lora_bias lora_modules_to_save lora_layer_replication "
    "lora_layers_pattern".split())
LF_IGNORED = frozenset((
    "trust_remote_code dataset eval_dataset dataset_dir media_dir preprocessing_num_workers overwrite_cache "
    "max_samples val_size plot_loss ddp_timeout image_min_pixels video_max_pixels video_min_pixels video_fps "
    "video_maxlen use_reentrant_gc tokenized_path streaming buffer_size mix_strategy interleave_probs "
    "enable_thinking freeze_trainable_modules freeze_extra_modules create_new_adapter"
).split())

LF_MARKERS = frozenset({"stage", "finetuning_type", "template", "cutoff_len", "dataset", "pure_bf16", "lora_target"})
