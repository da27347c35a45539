"""srdit.train"""
