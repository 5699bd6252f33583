"""Evaluation beyond the language-model loss: long-context recall tasks, memory inspection.

    mm_rec.evaluation.mqar        multi-query associative recall: generator and scorer
    mm_rec.evaluation.passkey     a number hidden at a chosen depth in filler text: generator and scorer
    mm_rec.evaluation.scoring     argmax predictions at chosen positions (what the scorers share)
    mm_rec.evaluation.inspect     decay spectra and attention over slot ages, as a PNG
    mm_rec.evaluation.long_documents  the loss by position in long files, state carried or reset
    mm_rec.evaluation.train_task  a small training loop on synthetic task batches

The command lines over them are mm_rec.cli.tasks (`mmrec eval --task mqar|passkey`) and
mm_rec.cli.inspect (`mmrec inspect`); `mmrec eval --task longdoc` is mm_rec.cli.longdoc.
"""
