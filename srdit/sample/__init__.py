"""srdit.sample"""
