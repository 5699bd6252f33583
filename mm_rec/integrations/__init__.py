"""Optional integrations with other libraries, each imported only when that library is in use.

    mm_rec.integrations.hf        Hugging Face transformers: MMRecHFConfig, MMRecForCausalLM (extra `hf`)
    mm_rec.integrations.lm_eval   lm-evaluation-harness: the `mmrec` model (extra `eval`)
    mm_rec.integrations.hook      installed by `import mm_rec`: registers the two above with their
                                  library when (and only when) that library is imported

`import mm_rec` never imports transformers or lm_eval itself (they take seconds to import).
"""
