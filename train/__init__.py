"""Fine-tuning job for LLaVA-1.5 (HF-native `LlavaForConditionalGeneration`) under SageMaker's training contract.

Importing the package has no side effects and pulls in no heavy libraries; `python -m train` runs the job.
"""
